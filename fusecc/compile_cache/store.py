"""Entries on disk: one file per key, written atomically, checked when read.

    <dir>/<key>.fcc:  b"FUSECC-CACHE 1\n" + one line of JSON (what it is, sha256 of the payload) + payload

A writer writes a temporary file in the same folder and renames it over the entry (os.replace is
atomic on POSIX), so concurrent processes compiling the same graph never leave a torn file: a
reader sees the old entry, the new one, or none. A file that fails its checksum or cannot be
parsed (truncated, edited, a disk error) is removed with a warning and the caller compiles again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MAGIC = b"FUSECC-CACHE 1\n"
SUFFIX = ".fcc"


class CorruptEntry(Exception):
    """A cache file that is not what was written."""


@dataclass
class EntryInfo:
    path: Path
    key: str
    size: int
    created: float
    description: str


def write_entry(directory: Path, key: str, payload: bytes, description: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    header = {"description": description, "created": time.time(), "size": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    path = directory / f"{key}{SUFFIX}"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(json.dumps(header).encode() + b"\n")
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_entry(directory: Path, key: str) -> Optional[bytes]:
    """The payload stored under `key`, or None (absent, or corrupt: then removed with a warning)."""
    path = directory / f"{key}{SUFFIX}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        _, payload = parse_entry(data)
        return payload
    except CorruptEntry as exc:
        discard(path, str(exc))
        return None


def parse_entry(data: bytes) -> tuple[dict, bytes]:
    if not data.startswith(MAGIC):
        raise CorruptEntry("not a fusecc cache file (bad header)")
    newline = data.find(b"\n", len(MAGIC))
    if newline < 0:
        raise CorruptEntry("truncated header")
    try:
        header = json.loads(data[len(MAGIC):newline])
    except ValueError:
        raise CorruptEntry("unreadable header") from None
    payload = data[newline + 1:]
    if len(payload) != header.get("size") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CorruptEntry("checksum mismatch (truncated or modified)")
    return header, payload


def discard(path: Path, why: str) -> None:
    warnings.warn(f"fusecc: discarding cache entry {path} ({why}); compiling again", stacklevel=3)
    path.unlink(missing_ok=True)


def list_entries(directory: Path) -> list[EntryInfo]:
    entries = []
    for path in sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []:
        try:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC))
                line = f.readline()
            header = json.loads(line) if head == MAGIC else {}
        except (OSError, ValueError):
            header = {}
        entries.append(EntryInfo(path, path.name[:-len(SUFFIX)], path.stat().st_size,
                                 header.get("created", path.stat().st_mtime),
                                 header.get("description", "unreadable entry")))
    return entries


def clear_entries(directory: Path) -> int:
    removed = 0
    for path in list(directory.glob(f"*{SUFFIX}")) + list(directory.glob(".*.tmp")) if directory.is_dir() else []:
        path.unlink(missing_ok=True)
        removed += 1
    return removed
