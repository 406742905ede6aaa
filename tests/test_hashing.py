"""The hash cache never accepts changed content (compiler.models.hashing)."""

from __future__ import annotations

import hashlib
import json
import os

from compiler.models import hashing


def _rewrite_in_place_keeping_mtime(path, offset: int, data: bytes) -> None:
    stat = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_bytes_changed_in_place_with_size_and_mtime_kept_are_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITC_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(1 << 20))
    first = hashing.file_sha256(weights)
    _rewrite_in_place_keeping_mtime(weights, 12345, b"\0" * 100)  # a tensor zeroed in place
    hashing._memory_cache.clear()  # another process
    assert hashing.file_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest() != first


def test_a_cache_entry_whose_fingerprint_disagrees_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITC_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(1 << 20))
    true = hashing.file_sha256(weights)
    cache = tmp_path / "cache" / "file-hashes.json"
    entries = json.loads(cache.read_text())
    entry = entries[str(weights.resolve())]
    assert set(entry) == {"size", "mtime_ns", "ctime_ns", "inode", "fingerprint", "sha256"}
    hashing._memory_cache.clear()
    cache.write_text(json.dumps({str(weights.resolve()): {**entry, "sha256": "f" * 64, "fingerprint": "0" * 64}}))
    assert hashing.file_sha256(weights) == true
    # Even a perfectly forged entry is not trusted where safety depends on it (apply's base check).
    hashing._memory_cache.clear()
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps({k: {**v, "sha256": "f" * 64} for k, v in entries.items()}))
    assert hashing.file_sha256(weights) == "f" * 64  # the cheap path trusts stat + fingerprint
    assert hashing.file_sha256(weights, full=True) == true
