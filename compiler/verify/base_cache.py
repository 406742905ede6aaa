"""The base model's verify images and judgements, kept in the editc cache.

In a release pipeline every candidate checkpoint is verified against the same base model with the
same recipe, so the base model's half of verify (generating its images, the judge's features and
labels of them) is the same every time. It is kept under the editc cache folder
(``$EDITC_CACHE_DIR``, see ``compiler.models.hashing.cache_dir``)::

    verify-base/<base model hash, 16 hex>/<key, 16 hex>/
        base.json      the key's fields, the judge's labels per kind
        images.npz     ``images`` (uint8 N x H x W x 3, in ``keys`` order) and ``features``

The key is the SHA-256 of a canonical JSON of everything that decides those images and
judgements: the base model's content hash, the judge (its kind and its files' content hash),
the (prompt, seed) pairs in order, steps, guidance, the scheduler's configuration, the
resolution, the batch size, device, dtype, the torch version, the candidate labels the judge
chooses among, and ``CACHE_VERSION``. Entries are written to a temporary folder and renamed
into place (``compiler.locate.cache.save_entry``); a cache that cannot be read or written is
ignored, never an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compiler.locate.cache import load_entry, save_entry
from compiler.models.hashing import cache_dir, folder_sha256
from compiler.verify.metrics import ImageSet, ModelView

CACHE_VERSION = 1
JSON_NAME = "base.json"

# What a report says about the base model's images.
CACHED = "cached"
GENERATED = "generated"
NOT_CACHED = "generated (cache off)"


def judge_identity(judge, judge_dir: str | Path | None) -> dict:
    """What decides a judge's answers: its kind and the content of its folder's files (the toy
    world's judge also reads the base model's text tower, which the base hash covers)."""
    identity = {"kind": type(judge).__name__}
    if judge_dir is not None and Path(judge_dir).is_dir():
        root = Path(judge_dir)
        files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
        identity["files_sha256"] = folder_sha256(root, files)
    else:
        identity["description"] = judge.description
    return identity


def pipeline_settings(pipe) -> dict:
    """The pipeline's own settings that change its pictures: scheduler, resolution, dtype, device."""
    from compiler.device import compute_tag

    unet = pipe.unet
    scheduler = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    size = int(unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    return {"scheduler": type(pipe.scheduler).__name__, "scheduler_config": scheduler,
            "resolution": [size, size], "dtype": str(unet.dtype), "device": str(unet.device),
            "compute": compute_tag(unet.device, unet.dtype)}  # the GPU model too: kernels differ


def settings_from_source(source, policy) -> dict | None:
    """:func:`pipeline_settings` of the pipeline ``load_for_generation`` would build from
    ``source`` (a ``ModelSource``) under ``policy``, found from its configs alone, without
    reading a weight; None where that cannot be told without loading (anything but a diffusers
    folder with a VAE). Equal to ``pipeline_settings(pipe)`` of the loaded model (tested), so
    that a second verify finds the base images cached before loading the base."""
    from compiler.device import compute_tag

    if source.format != "diffusers":
        return None
    vae_config = Path(source.path) / "vae" / "config.json"
    index = source.configs.get("model_index", {})
    try:
        import diffusers

        scheduler_class = getattr(diffusers, index["scheduler"][1])
        scheduler = scheduler_class.from_config(source.configs["scheduler"])
        vae = json.loads(vae_config.read_text())
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        size = int(source.configs["unet"]["sample_size"]) * scale
    except (KeyError, TypeError, ValueError, AttributeError, OSError, IndexError):
        return None
    dtype = policy.generation_dtype(source.stored_dtype)
    device = torch.device(policy.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"scheduler": type(scheduler).__name__, "scheduler_config": config, "resolution": [size, size],
            "dtype": str(dtype), "device": str(device), "compute": compute_tag(device, dtype)}


@dataclass
class BaseImageCache:
    """One verify's entry: where it lives and the fields its key hashes."""

    folder: Path
    fields: dict

    @classmethod
    def for_run(cls, *, base_sha256: str, judge: dict, keys: list[tuple[str, int]], steps: int,
                guidance: float, batch: int, candidates: dict, pipe=None,
                settings: dict | None = None) -> BaseImageCache:
        """The entry of one verify: ``pipe`` is the base pipeline, or ``settings`` its
        :func:`pipeline_settings` found without loading it (:func:`settings_from_source`)."""
        settings = settings if settings is not None else pipeline_settings(pipe)
        fields = {"cache_version": CACHE_VERSION, "base_sha256": base_sha256, "judge": judge,
                  "images": [[prompt, int(seed)] for prompt, seed in keys], "steps": int(steps),
                  "guidance": float(guidance), "batch": int(batch),
                  "candidates": {kind: list(labels) for kind, labels in sorted(candidates.items())},
                  "torch": torch.__version__, **settings}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
        return cls(cache_dir() / "verify-base" / base_sha256[:16] / key[:16], fields)

    def load(self) -> ModelView | None:
        """The cached images and judgements, or None (absent, unreadable or another key)."""
        entry = load_entry(self.folder, JSON_NAME)
        if entry is None:
            return None
        payload, arrays = entry
        try:
            if payload.get("fields") != json.loads(json.dumps(self.fields, default=str)):
                return None  # a 16-hex prefix collision or a damaged entry
            keys = [(prompt, int(seed)) for prompt, seed in self.fields["images"]]
            images, features = arrays["images"], arrays["features"]
            labels = {kind: list(values) for kind, values in payload["labels"].items()}
            if len(images) != len(keys) or len(features) != len(keys) or any(len(v) != len(keys) for v in labels.values()):
                return None
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return ModelView(ImageSet(keys, images), torch.from_numpy(np.ascontiguousarray(features)), labels)

    def save(self, view: ModelView) -> None:
        """Store a freshly judged base (best effort, atomic)."""
        payload = {"fields": self.fields, "labels": view.labels}
        arrays = {"images": view.images.images, "features": view.features.detach().cpu().numpy()}
        save_entry(self.folder, JSON_NAME, payload, arrays)
