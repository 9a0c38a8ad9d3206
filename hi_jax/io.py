"""Atomic writes of result files: a killed run never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` and renames the temporary file onto `path`.

    The temporary file sits in the same directory, so the rename is atomic on
    POSIX file systems: readers see the old file or the whole new one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_json(path: str, data: Any) -> None:
    """Writes `data` as indented JSON, atomically. NaN is not allowed."""

    def write(tmp_path):
        with open(tmp_path, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically."""

    def write(tmp_path):
        with open(tmp_path, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def save_figure(figure, path: str, **kwargs) -> None:
    """Saves a matplotlib figure atomically; the format follows the extension."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    atomic_write(path, lambda tmp_path: figure.savefig(tmp_path, format=fmt, **kwargs))
