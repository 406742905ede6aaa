"""How localization sweeps score images: CLIP-scores, and the judge's zero-shot presence.

Every judge gives CLIP-scores (raw cosine between each image and its prompt), the papers'
measure. A judge can also say whether an image *shows* a phrase ("does this image show the
van gogh style?"), which is far more telling than a raw cosine on a small image: the toy
world's judge over its canonical captions, a CLIP folder over the model's vocabulary
(``compiler.judges``). ``presence`` turns that into a 0/1 per image; for a judge that cannot
tell, it returns None and the sweeps fall back to CLIP-scores alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.judges import load_judge_for as _load_judge_for


def fit_to_judge(judge, images: np.ndarray) -> np.ndarray:
    """Resize images to a fixed-size judge's input when a sweep ran at another resolution
    (the toy world's CLIP; a CLIP folder judge preprocesses images itself)."""
    if hasattr(judge, "score_images"):
        return images
    config = getattr(getattr(judge, "model", None), "config", None)
    size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if size is None or images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in images])


def clip_scores(judge, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """The judge's CLIP-score of each image against its prompt."""
    if hasattr(judge, "score_images"):
        return np.asarray(judge.score_images(images, list(prompts)), dtype=np.float64)
    return np.asarray(judge.clip_scores(fit_to_judge(judge, images), list(prompts)), dtype=np.float64)


def can_judge_presence(judge, phrase: str) -> bool:
    return hasattr(judge, "can_tell") and judge.can_tell(phrase)


def presence(judge, images: np.ndarray, phrase: str) -> np.ndarray | None:
    """Per image, does the judge see ``phrase`` in it? (float 0/1; None if it cannot tell)."""
    if not can_judge_presence(judge, phrase):
        return None
    return np.asarray(judge.presence(fit_to_judge(judge, images), phrase), dtype=np.float64)


def load_judge_for(model_path: str | Path, judge_dir: str | Path | None = None, device=None):
    """The judge for a model (a diffusers folder) and an optional ``--judge`` folder: the toy
    world's for a toy-world model, else a local CLIP folder that classifies over the model's
    vocabulary (``compiler.judges.load_judge_for``)."""
    return _load_judge_for(model_path, judge_dir, device=device)
