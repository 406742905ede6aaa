"""What LocoGen and causal tracing measure of a set of images, and when a difference is real."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    """Mean CLIP-score against the scoring prompts, and the judge's rate of the judged phrase
    (the fraction of images showing it; None when the judge cannot tell)."""

    clip: float
    rate: float | None


# Below these contrasts between two references (a raw cosine of 1e-3, a rate difference of one
# image in a hundred) the references do not differ, and an effect or a recovery is undefined.
MIN_CLIP_CONTRAST = 1e-3
MIN_RATE_CONTRAST = 1e-2
