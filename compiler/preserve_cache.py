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

    def add(self, other: "CacheStats") -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.keys += other.keys


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
    _save_atomically(path, {"gram": gram.gram.contiguous()},
                     {"format": FORMAT, "n_rows": str(gram.n_rows), "kind": kind})


def _save_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Best effort and atomic: written to a temporary file beside ``path``, then renamed, so a
    reader sees the old entry or the whole new one; a read-only or racing cache never breaks a
    compile."""
    tmp = None
    try:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".entry-", suffix=".safetensors")
        os.close(fd)
        save_file({name: tensor.cpu() for name, tensor in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
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


# --------------------------------------------------------------------------------------------
# Prompt states for ranking neighbours
# --------------------------------------------------------------------------------------------
STATES_FORMAT = "editc-prompt-states/1"


def states_folder() -> Path:
    return cache_dir() / "prompt-states"


class PromptStateCache:
    """Per-prompt text-encoder states at one position, on disk, for ranking neighbours.

    Ranking an edit's neighbours encodes every concept of the vocabulary's attribute in a few
    templates (hundreds of prompts on a real vocabulary: ~20 s of a full-size SD-1.5 compile
    on 2 cores) although those states depend only on the text encoder, not on the recipe. One
    file per text encoder (content hash) and capture site holds them, indexed by (prompt,
    position); what is missing is encoded and appended. With no content hash (a pipeline in
    memory) or ``EDITC_NO_PRESERVE_CACHE=1`` nothing is stored.
    """

    def __init__(self, encoder_hash: str, kind: str, enabled: bool | None = None):
        enabled = enabled_by_environment() if enabled is None else enabled
        self.enabled = bool(enabled and encoder_hash)
        key = hashlib.sha256(json.dumps({"format": STATES_FORMAT, "encoder": encoder_hash, "kind": kind}).encode())
        self.path = states_folder() / f"{key.hexdigest()}.safetensors"
        self.hits = self.misses = 0

    def rows(self, prompts: Sequence[str], positions: Sequence[int],
             compute: Callable[[list[str], list[int]], torch.Tensor]) -> torch.Tensor:
        """The state of each prompt at its position (N × d): stored ones read, the rest computed
        by ``compute(prompts, positions)`` and stored."""
        wanted = list(zip(prompts, map(int, positions)))
        stored = self._read() if self.enabled else {}
        missing = list(dict.fromkeys(k for k in wanted if k not in stored))
        self.hits += len(set(wanted)) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = compute([p for p, _ in missing], [i for _, i in missing])
            new = dict(zip(missing, fresh))
            if self.enabled:
                self._write({**stored, **new})
            stored = {**stored, **new}
        return torch.stack([stored[k] for k in wanted])

    # The file as last read or written by this process, by path: (size, mtime_ns) and its
    # entries. A recipe of many edits ranks neighbours once per edit over the same file; parsing
    # it each time cost 30 ms per edit (100 styles: seconds). A changed file is read again.
    _memory: dict[Path, tuple[tuple[int, int], dict]] = {}

    def _read(self) -> dict[tuple[str, int], torch.Tensor]:
        try:
            stat = self.path.stat()
            remembered = self._memory.get(self.path)
            if remembered is not None and remembered[0] == (stat.st_size, stat.st_mtime_ns):
                return dict(remembered[1])
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != STATES_FORMAT:
                    return {}
                index = json.loads(metadata["index"])
                states = f.get_tensor("states")
            entries = {(str(p), int(i)): row for (p, i), row in zip(index, states)}
            self._memory[self.path] = ((stat.st_size, stat.st_mtime_ns), entries)
            return dict(entries)
        except Exception:  # noqa: BLE001 - an unreadable cache is empty
            return {}

    def _write(self, entries: dict[tuple[str, int], torch.Tensor]) -> None:
        index = [[p, i] for p, i in entries]
        states = torch.stack(list(entries.values())).contiguous()
        _save_atomically(self.path, {"states": states}, {"format": STATES_FORMAT, "index": json.dumps(index)})
        try:
            stat = self.path.stat()
            self._memory[self.path] = ((stat.st_size, stat.st_mtime_ns),
                                       {key: row for key, row in zip(entries, states.cpu())})
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Edit rows: the text-encoder states of one edit's prompt pairs
# --------------------------------------------------------------------------------------------
ROWS_FORMAT = "editc-edit-rows/1"


def rows_folder() -> Path:
    return cache_dir() / "edit-rows"


def cached_edit_rows(encoder_hash: str, kind: str, requests: Sequence[tuple[list[str], list[list[int]]]],
                     compute: Callable[[list[str], list[list[int]]], torch.Tensor], *,
                     enabled: bool | None = None, stats: CacheStats | None = None) -> list[torch.Tensor]:
    """Per request (one edit's prompts and, per prompt, its positions), its rows (R × d).

    An edit's rows depend on the text encoder and its prompts and positions only, not on λ, the
    weights, the preservation set or the output format, so re-compiling a recipe with any of
    those changed, or another recipe sharing an edit, reads them back (the very float32 bits
    computed, so edited tensors are bit-identical with and without the cache). The requests that
    miss are encoded in ONE call of ``compute`` (identical prompts across edits, such as a shared
    replacement's, encoded once), then split and stored one file per request."""
    enabled = enabled_by_environment() if enabled is None else enabled
    enabled = bool(enabled and encoder_hash)
    keys = [cache_key(encoder_hash, f"edit-rows:{kind}", prompts, positions) for prompts, positions in requests]
    found: dict[int, torch.Tensor] = {}
    if enabled:
        for index, key in enumerate(keys):
            rows = _read_rows(rows_folder() / f"{key}.safetensors")
            if rows is not None:
                found[index] = rows
    missing = [i for i in range(len(requests)) if i not in found]
    if stats is not None:
        stats.hits += len(found)
        stats.misses += len(missing)
    if missing:
        prompts = [p for i in missing for p in requests[i][0]]
        positions = [pos for i in missing for pos in requests[i][1]]
        fresh = compute(prompts, positions)
        offset = 0
        for i in missing:
            count = sum(len(pos) for pos in requests[i][1])
            found[i] = fresh[offset: offset + count]
            offset += count
            if enabled:
                _write_rows(rows_folder() / f"{keys[i]}.safetensors", found[i])
    return [found[i] for i in range(len(requests))]


def _read_rows(path: Path) -> torch.Tensor | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("format") != ROWS_FORMAT:
                return None
            return f.get_tensor("rows")
    except Exception:  # noqa: BLE001 - an unreadable entry is a miss
        return None


def _write_rows(path: Path, rows: torch.Tensor) -> None:
    _save_atomically(path, {"rows": rows.contiguous()}, {"format": ROWS_FORMAT})
