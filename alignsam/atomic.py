"""Atomic file writes: the one way this project writes files a user keeps (PNGs, tables, reports).

The bytes go to a temporary file in the destination directory, are flushed to disk, and the file
is moved onto its name with ``os.replace``: a reader (or a crash) sees the old file or the new one,
never half of one. Parent directories are created.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Union


def write_bytes_atomic(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a :class:`~pathlib.Path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Union[str, os.PathLike], text: str) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))
