"""The preservation Gram cache: ``PᵀP`` of the preservation rows, on disk.

Preservation rows (UCE-style: generic captions, the replacement's own prompts, the recipe's
``preserve`` names) keep everything else in place, and they depend only on the text encoder and
on the set of prompts and positions, not on the edits. Their Gram matrix (d × d float64 per
context width; H × d × d for Diff-QuickFix's per-head ``v_proj`` keys) is therefore cached under
the editc cache folder (``$EDITC_CACHE_DIR``, see ``compiler.models.hashing.cache_dir``) in
``preserve-gram/<key>.safetensors``, keyed by the SHA-256 of:

- the text encoder's content hash (its weight files' hash for a diffusers folder; the whole
  file's for a single file, which then changes whenever anything in the file does),
- what the rows are (the UNet context, layer 0's ``out_proj`` inputs, or ``v_proj`` keys),
- the prompts, in order, and the positions taken from each.

A hit returns the stored tensor, the very bits the miss computed and saved, so edited tensors
are bit-identical with and without the cache. ``EDITC_NO_PRESERVE_CACHE=1`` (or
``enabled=False``) turns it off; a cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler.models.hashing import cache_dir
from compiler.solve import PreservationGram, preservation_gram

FORMAT = "editc-preserve-gram/1"


@dataclass
class CacheStats:
    """What the cache did during one compile (reported in the manifest)."""

    hits: int = 0
    misses: int = 0
    keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses}


def enabled_by_environment() -> bool:
    return os.environ.get("EDITC_NO_PRESERVE_CACHE", "") not in ("1", "true", "yes")


def folder() -> Path:
    return cache_dir() / "preserve-gram"


def cache_key(encoder_hash: str, kind: str, prompts: Sequence[str], positions: Sequence[Sequence[int]]) -> str:
    identity = {"format": FORMAT, "encoder": encoder_hash, "kind": kind, "prompts": list(prompts),
                "positions": [list(map(int, p)) for p in positions]}
    return hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()


def cached_gram(encoder_hash: str, kind: str, prompts: Sequence[str], positions: Sequence[Sequence[int]],
                rows: Callable[[], torch.Tensor], *, enabled: bool | None = None,
                stats: CacheStats | None = None) -> PreservationGram:
    """``PᵀP`` of ``rows()`` (called only on a miss), from the cache when it is there."""
    enabled = enabled_by_environment() if enabled is None else enabled
    key = cache_key(encoder_hash, kind, prompts, positions)
    path = folder() / f"{key}.safetensors"
    if enabled:
        found = _read(path)
        if found is not None:
            if stats is not None:
                stats.hits += 1
                stats.keys.append(key)
            return found
    gram = preservation_gram(rows())
    if stats is not None:
        stats.misses += 1
        stats.keys.append(key)
    if enabled:
        _write(path, gram, kind)
    return gram


def _read(path: Path) -> PreservationGram | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                return None
            return PreservationGram(f.get_tensor("gram"), int(metadata["n_rows"]))
    except Exception:  # noqa: BLE001 - an unreadable cache entry is a miss
        return None


def _write(path: Path, gram: PreservationGram, kind: str) -> None:
    """Best effort and atomic: a read-only or racing cache never breaks a compile."""
    try:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gram-", suffix=".safetensors")
        os.close(fd)
        save_file({"gram": gram.gram.contiguous()}, tmp,
                  metadata={"format": FORMAT, "n_rows": str(gram.n_rows), "kind": kind})
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)  # type: ignore[possibly-undefined]
        except (OSError, NameError):
            pass


def text_encoder_hash(model, component: str = "text_encoder") -> str:
    """Content hash of one text encoder: its weight files in a diffusers folder, else the
    model's own hash (a single file: any change to the file invalidates)."""
    source = getattr(model, "source", None)
    if source is not None and source.format == "diffusers":
        from compiler.models.hashing import folder_sha256

        files = [f for f in source.weight_files if f.parent.name == component]
        if files:
            return folder_sha256(source.path, files)
    return str(model.model_hash or "")
