"""On-disk cache of localization results, so that compile and repeated runs never sweep twice.

Layout, under the editc cache folder (``$EDITC_CACHE_DIR``, else ``$XDG_CACHE_HOME/editc``,
else ``~/.cache/editc``)::

    locate/<model hash, 16 hex>/<concept slug>.<attribute>/<settings key, 16 hex>/
        locate.json    the LocateResult as JSON (to_dict)
        images.npz     the grid's images: clean, best window, c′ in every layer (uint8)
    trace/<model hash, 16 hex>/<subject slug>/<settings key, 16 hex>/
        trace.json, images.npz

The settings key is the SHA-256 of a canonical JSON of everything that changes the answer
(model hash, concept, replacement, attribute, prompts, seeds, steps, guidance, resolution,
max m, threshold, criterion, and ``CACHE_VERSION``). An entry is written to a temporary folder
and renamed into place, so readers never see half an entry; a racing writer simply loses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from compiler.models.hashing import cache_dir

# Bump when the meaning of a cached result changes (scoring, routing, schema).
CACHE_VERSION = 1


def slug(text: str) -> str:
    """'van gogh' -> 'van-gogh': a folder-name-safe form of a phrase."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "empty"


def settings_key(fields: dict) -> str:
    canonical = json.dumps({"cache_version": CACHE_VERSION, **fields}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def entry_dir(kind: str, model_hash: str, name: str, key: str) -> Path:
    """Where the entry of ``kind`` ('locate' or 'trace') for these settings lives."""
    return cache_dir() / kind / model_hash[:16] / name / key[:16]


def load_entry(folder: Path, json_name: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The cached JSON and images, or None when absent or unreadable."""
    try:
        payload = json.loads((folder / json_name).read_text())
        images_path = folder / "images.npz"
        images = {}
        if images_path.is_file():
            with np.load(images_path) as archive:
                images = {name: archive[name] for name in archive.files}
        return payload, images
    except (OSError, ValueError, KeyError):
        return None


def save_entry(folder: Path, json_name: str, payload: dict, images: dict[str, np.ndarray]) -> None:
    """Write an entry atomically. Best effort: a read-only cache never fails a sweep."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            (staging / json_name).write_text(json.dumps(payload, indent=2))
            if images:
                np.savez_compressed(staging / "images.npz", **images)
            if folder.exists():  # a concurrent run finished first; theirs is as good
                return
            os.replace(staging, folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass


def weights_fingerprint(pipe) -> str:
    """SHA-256 of the weights that decide a sweep's answer (UNet and text encoders), in memory.

    For callers that have a bare pipeline rather than a ``LoadedModel`` with its file hash.
    It hashes tensor bytes, so an in-memory edit changes it; a few seconds for SD-1.5.
    """
    import torch

    digest = hashlib.sha256()
    for component in ("text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{component}.{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
            data = tensor.detach().cpu().contiguous()
            if data.dtype == torch.bfloat16:  # numpy has no bfloat16; hash the raw bits
                data = data.view(torch.int16)
            digest.update(data.numpy().tobytes())
    return digest.hexdigest()
