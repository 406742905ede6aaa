"""Content hashes of model weights, streamed, with a small on-disk cache.

A single file's hash is the plain SHA-256 of its bytes (what ``sha256sum`` and A1111 report).
A diffusers folder's hash is the SHA-256 of the lines ``<relative path> <file sha256>`` of its
weight files in sorted order, so it changes when any weight file changes or moves.

Hashing a 7 GB checkpoint takes tens of seconds, so each file's digest is cached under the editc
cache folder (``$EDITC_CACHE_DIR``, else ``$XDG_CACHE_HOME/editc``, else ``~/.cache/editc``) in
``file-hashes.json``, keyed by absolute path. An entry is used only while the file's size,
mtime, ctime and inode are unchanged (ctime cannot be set back: rewriting bytes in place and
restoring the mtime still moves it) *and* a fingerprint of its bytes matches (SHA-256 of 64
blocks of 4 KiB spread over the file, ~1 ms). Where a wrong hash would be a safety failure
(``editc apply`` deciding a checkpoint is the delta's base) the caller asks for ``full=True``:
the bytes are hashed again and the cache is only written, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 8 * 1024 * 1024
_memory_cache: dict[tuple, str] = {}


def cache_dir() -> Path:
    if os.environ.get("EDITC_CACHE_DIR"):
        return Path(os.environ["EDITC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "editc"


def _cache_file() -> Path:
    return cache_dir() / "file-hashes.json"


def _read_cache() -> dict[str, dict]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict[str, dict]) -> None:
    """Best effort, atomic: a read-only or racing cache never breaks loading."""
    try:
        folder = _cache_file().parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".file-hashes-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, _cache_file())
    except OSError:
        pass


_FINGERPRINT_BLOCKS = 64
_FINGERPRINT_BLOCK = 4096


def fingerprint(path: Path, size: int) -> str:
    """SHA-256 of the size and 64 blocks of 4 KiB at evenly spaced offsets (first and last
    included): reads 256 KiB whatever the file's size."""
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        span = max(0, size - _FINGERPRINT_BLOCK)
        for i in range(_FINGERPRINT_BLOCKS):
            f.seek(span * i // (_FINGERPRINT_BLOCKS - 1))
            h.update(f.read(_FINGERPRINT_BLOCK))
    return h.hexdigest()


def _stat_key(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def file_sha256(path: str | Path, *, full: bool = False) -> str:
    """Hex SHA-256 of a file's bytes, cached (see the module docstring); ``full`` hashes the
    bytes again whatever the cache says."""
    path = Path(path).resolve()
    stat = _stat_key(path)
    key = (str(path), *stat.values())
    if not full and key in _memory_cache:
        return _memory_cache[key]
    entry = None if full else _read_cache().get(str(path))
    if (entry and all(entry.get(k) == v for k, v in stat.items())
            and entry.get("fingerprint") == fingerprint(path, stat["size"])):
        digest = entry["sha256"]
    else:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        if _stat_key(path) == stat:  # unchanged while we read it: worth remembering
            entries = _read_cache()  # re-read: another process may have added entries meanwhile
            entries[str(path)] = {**stat, "fingerprint": fingerprint(path, stat["size"]), "sha256": digest}
            _write_cache(entries)
    _memory_cache[key] = digest
    return digest


def folder_sha256(root: str | Path, files: Iterable[str | Path], *, full: bool = False) -> str:
    """Hash of a set of weight files inside ``root`` (see the module docstring)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in files):
        # The name inside root as listed, not as resolved: in a Hugging Face cache snapshot the
        # weight files are symlinks into ../../blobs; their bytes (file_sha256 follows the link)
        # are the content, their names in the snapshot the layout.
        relative = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()
        if relative.startswith("../"):
            raise ValueError(f"{path} is not inside {root}")
        h.update(f"{relative} {file_sha256(path, full=full)}\n".encode())
    return h.hexdigest()
