"""Who may import whom, read from the import statements: runtime knows no bus, vision no bus or rules, rules
no bus, vision, runtime or I/O, and the daemon never reaches the fleet package, torch or plotting libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from _pytest.mark import ParameterSet

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cabin_monitor"

# Where the daemon starts: the composition root, and what it loads only when configured to.
DAEMON_ROOTS = ("cabin_monitor.daemon", "cabin_monitor.runtime.prometheus", "cabin_monitor.runtime.recorder")
NEVER_IN_THE_DAEMON = ("cabin_monitor.fleet", "torch", "dask", "distributed", "psycopg", "matplotlib", "plotly")
# Network, database and process modules: no rule touches them.
NETWORK_AND_PROCESSES = (
    "socket",
    "ssl",
    "http",
    "urllib",
    "asyncio",
    "selectors",
    "sqlite3",
    "paho",
    "psycopg",
    "subprocess",
    "multiprocessing",
)
# File modules: only the rules in force persist (their override file).
FILES = ("os", "io", "shutil", "tempfile", "fcntl", "pathlib")
# The live and the shadow rules in force keep their override files.
RULES_PERSISTENCE = (PACKAGE / "rules" / "in_force.py", PACKAGE / "rules" / "shadow.py")
# Imports that break a rule on this branch; each flips to a pass (and so fails, strict) once it is gone.
KNOWN_BREACHES: dict[tuple[str, str], str] = {}


def imports_of(path: Path) -> set[str]:
    """Every absolute module an import statement in the file names, at any depth, with ``from`` names joined on."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module if node.level == 0 else _resolve_relative(path, node.level, node.module)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def _resolve_relative(path: Path, level: int, module: str) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts[:-level]
    return ".".join([*parts, module])


def names(module: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``module`` is one of ``prefixes`` or inside one."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def files_in(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def module_file(module: str) -> Path | None:
    """The source file of a ``cabin_monitor`` module (None for a name inside a module, or another package)."""
    if not names(module, ("cabin_monitor",)):
        return None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def daemon_files() -> set[Path]:
    """Every source file the daemon's roots reach through ``cabin_monitor`` imports (packages' __init__ too)."""
    todo = [f for root in DAEMON_ROOTS if (f := module_file(root)) is not None]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imports_of(path):
            parts = module.split(".")
            for n in range(2, len(parts) + 1):  # a module loads every package above it
                found = module_file(".".join(parts[:n]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def params(rule: str, paths: list[Path] | set[Path]) -> list[ParameterSet]:
    """``paths`` as test parameters of ``rule``, each expected to fail where it is a known breach of it."""
    out = []
    for path in sorted(paths):
        name = str(path.relative_to(PACKAGE))
        reason = KNOWN_BREACHES.get((rule, name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(path, id=name, marks=marks))
    return out


def offending(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imports_of(path) if names(m, prefixes))


def test_the_layers_have_their_files() -> None:
    """The layers the rules below speak of exist and hold modules, so no rule passes for want of files."""
    for layer in ("runtime", "vision", "rules", "bus"):
        assert len(files_in(layer)) >= 2, layer
    assert len(daemon_files()) > 30


@pytest.mark.parametrize("path", params("runtime", files_in("runtime")))
def test_runtime_imports_no_bus_module(path: Path) -> None:
    """runtime/ gets its sinks and request queue injected: it imports nothing from bus/."""
    assert offending(path, ("cabin_monitor.bus",)) == []


@pytest.mark.parametrize("path", params("vision", files_in("vision")))
def test_vision_knows_no_broker_and_no_rules(path: Path) -> None:
    """vision/ imports nothing from bus/ or rules/."""
    assert offending(path, ("cabin_monitor.bus", "cabin_monitor.rules")) == []


@pytest.mark.parametrize("path", params("rules", files_in("rules")))
def test_rules_know_no_transport_vision_runtime_or_io(path: Path) -> None:
    """rules/ imports nothing from bus/, vision/ or runtime/, no network, database or process module, and no
    file module outside the rules in force's persistence."""
    files = () if path in RULES_PERSISTENCE else FILES
    forbidden = ("cabin_monitor.bus", "cabin_monitor.vision", "cabin_monitor.runtime", *NETWORK_AND_PROCESSES, *files)
    assert offending(path, forbidden) == []


@pytest.mark.parametrize("path", params("daemon", daemon_files()))
def test_the_daemon_never_imports_fleet_torch_dask_psycopg_or_plotting(path: Path) -> None:
    """No module the daemon loads imports cabin_monitor.fleet, torch, dask, psycopg, matplotlib or plotly."""
    assert offending(path, NEVER_IN_THE_DAEMON) == []


def test_the_rules_catch_a_breach(tmp_path: Path) -> None:
    """The import reader sees an import inside a function and a relative one, so a breach cannot hide."""
    path = PACKAGE / "runtime" / "mailbox.py"
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from cabin_monitor.bus import mqtt\n    import torch.nn\n")
    found = {m for m in imports_of(source) if names(m, ("cabin_monitor.bus", "torch"))}
    assert found == {"cabin_monitor.bus", "cabin_monitor.bus.mqtt", "torch.nn"}
    assert _resolve_relative(path, 2, "bus.outbox") == "cabin_monitor.bus.outbox"
