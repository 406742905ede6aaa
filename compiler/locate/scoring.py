"""How localization sweeps score images: CLIP-scores, and the judge's zero-shot presence.

Every judge gives CLIP-scores (raw cosine between each image and its prompt), the papers'
measure. A judge can also say whether an image *shows* a phrase ("does this image show the
van gogh style?"), which is far more telling than a raw cosine on a small image: the toy
world's judge over its canonical captions, a CLIP folder over the model's vocabulary
(``compiler.judges``). ``presence`` turns that into a 0/1 per image; for a judge that cannot
tell, it returns None and the sweeps fall back to CLIP-scores alone.

LocoGen's window scores come from those measures (``score_window``, ``choose_window``): a
window's *effect* is (window − clean) / (replaced − clean), where "clean" is c in every layer
and "replaced" is c′ in every layer (see ``compiler.locate.locogen``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.judges import load_judge_for as _load_judge_for
from compiler.locate.measure import MIN_CLIP_CONTRAST, MIN_RATE_CONTRAST, Measurement
from compiler.models.families import LayerWindow


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


# ----------------------------------------------------------------------------- LocoGen's windows
@dataclass(frozen=True)
class WindowScore:
    start: int
    size: int
    clip: float
    rate: float | None
    clip_effect: float | None  # (clip − clean) / (replaced − clean); None: no contrast
    rate_effect: float | None
    passed: bool

    @property
    def window(self) -> LayerWindow:
        return LayerWindow(self.start, self.size)


def judged_measure(attribute: str, concept: str, replacement: str) -> tuple[str, bool, str]:
    """(phrase whose rate is measured, higher is better?, which prompts to CLIP-score against)."""
    if attribute == "fact":
        return replacement, True, "target"
    return concept, False, "original"


def mean_measurement(samples: list[tuple], window_row: int, clip: np.ndarray, rate: np.ndarray,
                     judges_presence: bool) -> Measurement:
    """The mean CLIP-score and rate of the samples ``(window row, prompt, seed)`` of one window row."""
    rows = [k for k, sample in enumerate(samples) if sample[0] == window_row]
    return Measurement(float(np.mean(clip[rows])), float(np.mean(rate[rows])) if judges_presence else None)


def effect(value: float | None, clean: float | None, replaced: float | None, min_contrast: float) -> float | None:
    """(value − clean) / (replaced − clean), or None when clean and replaced do not differ."""
    if value is None or clean is None or replaced is None:
        return None
    contrast = replaced - clean
    if abs(contrast) < min_contrast:
        return None
    return (value - clean) / contrast


def score_window(window: LayerWindow, measured: Measurement, clean: Measurement, replaced: Measurement,
                 criterion: str, threshold: float, can_pass: bool = True) -> WindowScore:
    """A window's measures, effects, and whether the deciding effect reaches ``threshold``."""
    clip_effect = effect(measured.clip, clean.clip, replaced.clip, MIN_CLIP_CONTRAST)
    rate_effect = effect(measured.rate, clean.rate, replaced.rate, MIN_RATE_CONTRAST)
    decisive = rate_effect if criterion == "accuracy" else clip_effect
    return WindowScore(window.start, window.size, measured.clip, measured.rate, clip_effect, rate_effect,
                       can_pass and decisive is not None and decisive >= threshold)


def contrast_notes(clean: Measurement, replaced: Measurement, criterion: str, higher_is_better: bool) -> list[str]:
    """Warnings when the references say the sweep cannot mean much."""
    if criterion == "accuracy":
        before, after, minimum = clean.rate, replaced.rate, MIN_RATE_CONTRAST
    else:
        before, after, minimum = clean.clip, replaced.clip, MIN_CLIP_CONTRAST
    if abs(after - before) < minimum:
        return [f"c and c' give the same score (clean {before:.3f}, c' everywhere {after:.3f}): the model "
                f"does not show the concept, or the judge cannot tell; no window can pass"]
    if (after - before) * (1.0 if higher_is_better else -1.0) < 0:
        return ["replacing the prompt everywhere moves the score the wrong way; the replacement may not "
                "be a neutral version of the concept"]
    return []


def _rank_key(score: WindowScore, criterion: str, higher_is_better: bool) -> tuple:
    sign = -1.0 if higher_is_better else 1.0
    primary = score.rate if criterion == "accuracy" else score.clip
    return (sign * primary, sign * score.clip, score.start)


def choose_window(scores: list[WindowScore], criterion: str, higher_is_better: bool) -> tuple[WindowScore, bool]:
    """The smallest m whose best window passes, and that window; else the strongest window of
    any size (largest deciding effect, then largest CLIP effect: a judge's rate moves in steps
    of 1/N images and ties often; then the smaller window)."""
    for m in sorted({s.size for s in scores}):
        best = min((s for s in scores if s.size == m), key=lambda s: _rank_key(s, criterion, higher_is_better))
        if best.passed:
            return best, True

    def strength(s: WindowScore) -> tuple:
        decisive = s.rate_effect if criterion == "accuracy" else s.clip_effect
        return (-(decisive if decisive is not None else -math.inf),
                -(s.clip_effect if s.clip_effect is not None else -math.inf), s.size, s.start)

    return min(scores, key=strength), False
