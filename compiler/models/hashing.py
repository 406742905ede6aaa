"""Content hashes of model weights, streamed, with a small on-disk cache.

A single file's hash is the plain SHA-256 of its bytes (what ``sha256sum`` and A1111 report).
A diffusers folder's hash is the SHA-256 of the lines ``<relative path> <file sha256>`` of its
weight files in sorted order, so it changes when any weight file changes or moves.

Hashing a 7 GB checkpoint takes tens of seconds, so each file's digest is cached under the editc
cache folder (``$EDITC_CACHE_DIR``, else ``$XDG_CACHE_HOME/editc``, else ``~/.cache/editc``)
keyed by absolute path, size and modification time; a file that changes gets hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 8 * 1024 * 1024
_memory_cache: dict[tuple[str, int, int], str] = {}


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


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, cached by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _memory_cache:
        return _memory_cache[key]
    entries = _read_cache()
    entry = entries.get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        digest = entry["sha256"]
    else:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        entries = _read_cache()  # re-read: another process may have added entries meanwhile
        entries[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        _write_cache(entries)
    _memory_cache[key] = digest
    return digest


def folder_sha256(root: str | Path, files: Iterable[str | Path]) -> str:
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
        h.update(f"{relative} {file_sha256(path)}\n".encode())
    return h.hexdigest()
