"""The embedded toy world: a miniature Stable Diffusion trained here on a synthetic world.

- ``world``: what exists (objects, colours, styles, characters, people, facts) and the captions.
- ``render``: draws a caption's scene as a 32x32 RGB image, deterministically from a seed.
- ``train``: the reproducible, resumable training of CLIP, the VAE and the UNet.
- ``judge``: the trained CLIP as a zero-shot classifier and CLIP-scorer of generated images.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
JUDGE_DIR = WEIGHTS_DIR / "judge"
