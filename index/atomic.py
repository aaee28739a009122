"""Atomic file writes, for every package (index/ imports nothing of ours, so all may use it).

A file is written to a temporary name beside its target, flushed and fsynced, made readable
(``mkstemp`` creates it private: 0600), renamed over the target with ``os.replace`` and the
folder fsynced. A crash at any point leaves either the old file or the new one, never half
of one; a failure removes the temporary file and re-raises.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o644


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(handle)`` (a binary file handle), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, value: Any, *, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` durably (fsynced). A line a crash cut short
    (the file does not end with a newline) is cut off first, so lines never run together."""
    path = Path(path)
    with open(path, "a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                handle.seek(0)
                whole = handle.read()
                handle.truncate(whole.rfind(b"\n") + 1)
        handle.seek(0, os.SEEK_END)
        handle.write(line.encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def file_lock(path: str | Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if missing) between processes of one
    machine: exclusive, or ``shared`` with other shared holders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
