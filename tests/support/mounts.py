"""Real filesystem faults for tests: a small tmpfs, remounted read-only or filled up, and read-only bind mounts.

Mounting needs root (CI runs the tests as root); elsewhere the helpers skip the test, saying why.
Root ignores file modes, so a read-only mount is the way to make a file or folder unwritable.
``pin_wal`` makes a full disk bite SQLite at once: without it, a WAL file keeps room from earlier
commits and some writes still fit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise OSError(f"mount {' '.join(args)} failed: {proc.stderr.strip()}")


def _umount(path: Path) -> None:
    # Lazy: a test that failed may have left a file open there.
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def require_mounting() -> None:
    """Skip the test unless it runs as root, which mounting filesystems needs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")


@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int) -> Iterator[Path]:
    """A fresh tmpfs of ``size_kib`` KiB mounted on ``path`` (created), unmounted afterwards."""
    require_mounting()
    path.mkdir(parents=True, exist_ok=True)
    try:
        _mount("-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(path))
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield path
    finally:
        _umount(path)


def remount(path: Path, *, read_only: bool) -> None:
    """Remount the filesystem mounted on ``path`` read-only or read-write."""
    _mount("-o", "remount,ro" if read_only else "remount,rw", str(path))


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[Path]:
    """``path`` (a file or folder) bind-mounted read-only over itself for the block; its folder stays writable."""
    require_mounting()
    try:
        _mount("--bind", str(path), str(path))
    except OSError as exc:
        pytest.skip(f"cannot bind-mount here: {exc}")
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _umount(path)


def fill(folder: Path, name: str = "filler") -> Path:
    """Write a file in ``folder`` until its filesystem has no space left; returns it (delete it to free the space)."""
    filler = folder / name
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    # Smaller writes take the last partial page too.
    with filler.open("ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 64)
    return filler


@contextlib.contextmanager
def pin_wal(database: Path) -> Iterator[None]:
    """A second connection holding a read snapshot, so the WAL cannot be recycled and every write must grow it."""
    reader = sqlite3.connect(database, isolation_level=None)
    try:
        # A commit of its own first, so that its snapshot reaches into the WAL (one taken on a fully
        # checkpointed WAL reads the main file only, and the writer could still start the WAL over).
        reader.execute("CREATE TABLE IF NOT EXISTS test_pin (x)")
        reader.execute("INSERT INTO test_pin VALUES (1)")
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM test_pin").fetchone()
        yield
    finally:
        reader.close()
