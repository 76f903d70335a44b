"""One feature-cache entry on disk: a checked single-file format, written atomically.

Layout of an entry file (all integers little-endian)::

    magic  8 bytes   b"ALSFEAT1"
    u32              header length L
    u32              CRC-32 of the header bytes
    header L bytes   UTF-8 JSON: {"key", "meta", "payload_nbytes", "payload_crc32",
                                  "arrays": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}
    payload          the arrays' raw C-order bytes, each starting at a multiple of ``ALIGN``

Reading checks the magic, both checksums, the total size (a truncated file is too short) and that
every array's dtype/shape/offset fits the payload; any failure raises :class:`CorruptEntryError`.
Writing goes to a uniquely named temporary file in the entry's directory, is flushed and fsynced,
then ``os.replace``-d onto the final name, so a reader sees either no entry or a complete one, and
concurrent writers of the same entry simply leave the last complete copy.

Why not ``torch.save``: this format reads a 2 MiB embedding with one ``readinto`` and zero copies
(``np.frombuffer``); ``benchmarks/feature_cache.py`` compares the two.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, Mapping, Optional, Tuple, Union

import numpy as np

MAGIC = b"ALSFEAT1"
PREFIX = struct.Struct("<8sII")  # magic, header length, header CRC-32
ALIGN = 64
TEMP_SUFFIX = ".tmp"
MAX_HEADER_BYTES = 1 << 20
# Only plain numeric dtypes are stored (no object arrays can be smuggled in through a header).
ALLOWED_DTYPES = frozenset({"|u1", "|i1", "|b1", "<f2", "<f4", "<f8", "<i2", "<i4", "<i8", "<u2", "<u4"})

PathLike = Union[str, Path]


class CorruptEntryError(ValueError):
    """An entry file is truncated, altered or not an entry at all (the message names the file)."""


def _padding(offset: int) -> int:
    return (-offset) % ALIGN


def _as_little_endian(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype.str not in ALLOWED_DTYPES:
        raise TypeError(f"cannot store dtype {array.dtype} in a feature entry (allowed: {sorted(ALLOWED_DTYPES)})")
    return array


def encode_entry(key: str, arrays: Mapping[str, np.ndarray], meta: Optional[Mapping[str, Any]] = None) -> Tuple[bytes, list]:
    """Prefix+header bytes and the payload chunks (memoryviews and padding) of one entry."""
    table, chunks, offset, crc = [], [], 0, 0
    for name, array in arrays.items():
        array = _as_little_endian(np.asarray(array))
        pad = _padding(offset)
        if pad:
            chunks.append(bytes(pad))
            crc = zlib.crc32(bytes(pad), crc)
            offset += pad
        view = memoryview(array).cast("B")
        table.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "offset": offset, "nbytes": view.nbytes})
        chunks.append(view)
        crc = zlib.crc32(view, crc)
        offset += view.nbytes
    header = json.dumps(
        {"key": key, "meta": dict(meta or {}), "arrays": table, "payload_nbytes": offset, "payload_crc32": crc},
        sort_keys=True,
    ).encode("utf-8")
    return PREFIX.pack(MAGIC, len(header), zlib.crc32(header)) + header, chunks


def _write_chunks(file: BinaryIO, chunks: Iterable) -> None:
    """Write every chunk (a seam for tests that simulate a crash mid-write)."""
    for chunk in chunks:
        file.write(chunk)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); silently skipped where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_entry(
    path: PathLike,
    key: str,
    arrays: Mapping[str, np.ndarray],
    meta: Optional[Mapping[str, Any]] = None,
    fsync: bool = True,
) -> None:
    """Atomically write one entry to ``path`` (temporary file + fsync + ``os.replace``).

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head, chunks = encode_entry(key, arrays, meta)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o644)  # mkstemp makes 0600; other users of a shared cache read it
            _write_chunks(file, [head, *chunks])
            file.flush()
            if fsync:
                os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if fsync:
        _fsync_directory(path.parent)


def read_entry(path: PathLike, expected_key: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Read and verify one entry -> ``(arrays, meta)``; arrays are writable views of one buffer.

    Raises:
        FileNotFoundError: no entry at ``path``.
        CorruptEntryError: anything about the file does not check out (the message says what).
    """
    path = Path(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        buffer = bytearray(size)
        got = file.readinto(buffer)
    if got != size:
        raise CorruptEntryError(f"{path}: file changed while reading ({got} of {size} bytes)")
    if size < PREFIX.size:
        raise CorruptEntryError(f"{path}: truncated ({size} bytes, shorter than the {PREFIX.size}-byte prefix)")
    magic, header_len, header_crc = PREFIX.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise CorruptEntryError(f"{path}: not a feature-cache entry (magic {magic!r})")
    header_end = PREFIX.size + header_len
    if header_len > MAX_HEADER_BYTES or header_end > size:
        raise CorruptEntryError(f"{path}: truncated or corrupt header (length {header_len}, file {size} bytes)")
    header_bytes = bytes(buffer[PREFIX.size:header_end])
    if zlib.crc32(header_bytes) != header_crc:
        raise CorruptEntryError(f"{path}: header checksum mismatch")
    try:
        header = json.loads(header_bytes)
    except ValueError as err:
        raise CorruptEntryError(f"{path}: unreadable header: {err}") from err
    try:
        return _arrays_from_payload(path, header, memoryview(buffer)[header_end:], expected_key)
    except (KeyError, TypeError, ValueError) as err:  # a well-formed JSON header of the wrong shape
        if isinstance(err, CorruptEntryError):
            raise
        raise CorruptEntryError(f"{path}: malformed header: {err!r}") from err


def _arrays_from_payload(
    path: Path, header: Dict[str, Any], payload: memoryview, expected_key: Optional[str]
) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    if payload.nbytes != header["payload_nbytes"]:
        state = "truncated" if payload.nbytes < header["payload_nbytes"] else "has trailing bytes"
        raise CorruptEntryError(f"{path}: payload {state} ({payload.nbytes} of {header['payload_nbytes']} bytes)")
    if zlib.crc32(payload) != header["payload_crc32"]:
        raise CorruptEntryError(f"{path}: payload checksum mismatch")
    if expected_key is not None and header["key"] != expected_key:
        raise CorruptEntryError(f"{path}: holds key {header['key']}, expected {expected_key}")
    arrays = {}
    for spec in header["arrays"]:
        if spec["dtype"] not in ALLOWED_DTYPES:
            raise CorruptEntryError(f"{path}: array '{spec['name']}' has unsupported dtype {spec['dtype']}")
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"], dtype=np.int64))
        if count * dtype.itemsize != spec["nbytes"] or spec["offset"] + spec["nbytes"] > payload.nbytes:
            raise CorruptEntryError(f"{path}: array '{spec['name']}' does not fit its declared shape {spec['shape']}")
        arrays[spec["name"]] = np.frombuffer(payload, dtype, count, spec["offset"]).reshape(spec["shape"])
    return arrays, header["meta"]


def remove_stale_temp_files(root: PathLike, max_age_s: float = 3600.0) -> int:
    """Delete temporary files older than ``max_age_s`` left under ``root`` by killed writers.

    Readers never look at temporary files; this only reclaims disk space. The age threshold keeps
    files that a live writer (another rank) is still writing. Returns how many were removed.
    """
    removed, now = 0, time.time()
    for tmp in Path(root).rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime >= max_age_s:
                tmp.unlink()
                removed += 1
    return removed
