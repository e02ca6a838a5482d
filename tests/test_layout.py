"""The layout's promises: the run-time package never loads torch or the tests, and installs without test helpers."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cabin_monitor"
# Everything but training/, which is the one place that may use torch.
RUNTIME_FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "training")


def imports_of(path: Path) -> set[str]:
    """Every module an ``import`` statement in the file names, at any depth (inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_run_time_module_imports_torch_or_the_tests() -> None:
    """Outside training/, no import statement names torch or anything under tests/."""
    assert len(RUNTIME_FILES) > 30
    offenders = {
        str(path.relative_to(REPO)): sorted(bad)
        for path in RUNTIME_FILES
        if (bad := {m for m in imports_of(path) if m.split(".")[0] in ("torch", "tests")})
    }
    assert offenders == {}


def test_the_rules_engine_and_every_rule_import_no_io_module() -> None:
    """The engine, the registry and each rule type's module import only the standard library, config, messages,
    errors and rules."""
    from cabin_monitor.rules import RULES

    modules = {"base", "engine", "registry", *(type(rule).__module__.rpartition(".")[2] for rule in RULES)}
    allowed = ("cabin_monitor.config", "cabin_monitor.messages", "cabin_monitor.errors", "cabin_monitor.rules")
    offenders = {
        name: sorted(bad)
        for name in modules
        if (
            bad := {
                m
                for m in imports_of(PACKAGE / "rules" / f"{name}.py")
                if m.split(".")[0] not in sys.stdlib_module_names and not m.startswith(allowed)
            }
        )
    }
    assert len(modules) >= 6
    assert offenders == {}


def test_only_the_command_line_reaches_into_training() -> None:
    """Outside training/, only cli.py (its train, export and explain sub-commands) imports training; scripts never."""
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert scripts
    offenders = {
        str(path.relative_to(REPO)): sorted(bad)
        for path in [*RUNTIME_FILES, *scripts]
        if path != PACKAGE / "cli.py"
        and (bad := {m for m in imports_of(path) if m.startswith("cabin_monitor.training")})
    }
    assert offenders == {}


def test_ci_runs_the_readme_test_command_and_the_static_checks() -> None:
    """.ci/run holds the README's test command (with the dev extra) and runs ruff, ruff format and mypy."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv") and "pytest" in line]
    assert command in ci.splitlines()
    assert "dev" in command.split('-e ".[')[1].split("]")[0].split(",")
    for check in (".venv/bin/ruff check .", ".venv/bin/ruff format --check .", ".venv/bin/mypy cabin_monitor tests"):
        assert check in ci.splitlines()


IMPORT_ALL_WITHOUT_TORCH = """
import importlib, sys
from importlib.abc import MetaPathFinder

class NoTorch(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is not installed here")
        return None

sys.meta_path.insert(0, NoTorch())
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tests"))
assert not loaded, loaded
print(len(sys.argv) - 1)
"""


def test_every_run_time_module_imports_where_torch_is_missing() -> None:
    """With torch unimportable, every module outside training/ (and what it imports in turn) still loads."""
    modules = [
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in RUNTIME_FILES
        if path.name != "__main__.py"  # it runs the command line
    ]
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL_WITHOUT_TORCH, *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout) == len(modules)


@pytest.mark.slow
def test_the_wheel_holds_no_test_helpers(tmp_path: Path) -> None:
    """A wheel built from the project has the package and its data, and none of tests/ (broker, PKI, daemon)."""
    source = tmp_path / "source"
    # tests/ is copied too, so that packaging settings that would take it in are caught.
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("cabin_monitor", "models", "tests"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("cabin_monitor-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        sources = {n: archive.read(n).decode() for n in names if n.endswith(".py")}
    assert {
        "cabin_monitor/daemon.py",
        "cabin_monitor/vision/reader.py",
        "cabin_monitor/bus/mqtt.py",
        "cabin_monitor/py.typed",
        "cabin_monitor/samples/single_face.jpg",
        "cabin_monitor/training/mean_shape_68.json",
    } <= set(names)
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    helpers = ("class MosquittoBroker", "class DaemonProcess", "def make_test_pki", "class ScriptedCamera")
    assert not [n for n, text in sources.items() if any(h in text for h in helpers)]


def test_the_rules_and_the_pipeline_import_no_bus_module() -> None:
    """rules/ names no bus, vision or runtime module; the pipeline and its ports name no bus module."""
    outside = ("cabin_monitor.bus", "cabin_monitor.vision", "cabin_monitor.runtime")
    offenders = {
        str(path.relative_to(REPO)): sorted(bad)
        for path in sorted((PACKAGE / "rules").glob("*.py"))
        if (bad := {m for m in imports_of(path) if m.startswith(outside)})
    }
    for path in (PACKAGE / "runtime" / "pipeline.py", PACKAGE / "runtime" / "ports.py"):
        if bad := {m for m in imports_of(path) if m.startswith("cabin_monitor.bus")}:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}
