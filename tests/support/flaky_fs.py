"""A real fsspec filesystem with an injected fault: the local one, whose first uploads break off mid-file."""

from __future__ import annotations

from typing import Any

from fsspec.implementations.local import LocalFileSystem


class FlakyFileSystem(LocalFileSystem):  # type: ignore[misc]
    """Local files; the first ``failing_opens`` files opened for writing fail once ``fail_after_bytes`` are written
    (a dropped connection). ``writes`` lists each write-open's mode and the bytes that reached it."""

    def __init__(self, fail_after_bytes: int, failing_opens: int, **kwargs: Any) -> None:
        super().__init__(skip_instance_cache=True, **kwargs)
        self.fail_after_bytes = fail_after_bytes
        self.failing_opens = failing_opens
        self.writes: list[list[Any]] = []  # [mode, bytes written]

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        opened = super()._open(path, mode, block_size, **kwargs)
        if "r" in mode:
            return opened
        self.writes.append([mode, 0])
        budget = self.fail_after_bytes if len(self.writes) <= self.failing_opens else None
        return _CountedFile(opened, self.writes[-1], budget)


class _CountedFile:
    """A file open for writing that counts what is written and may fail after a budget of bytes."""

    def __init__(self, inner: Any, record: list[Any], budget: int | None) -> None:
        self._inner, self._record, self._budget = inner, record, budget

    def write(self, data: bytes) -> int:
        if self._budget is not None and self._record[1] + len(data) > self._budget:
            part = self._budget - self._record[1]
            self._inner.write(data[:part])
            self._record[1] += part
            raise ConnectionResetError("connection reset by the store (injected)")
        self._record[1] += len(data)
        return int(self._inner.write(data))

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
