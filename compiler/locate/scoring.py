"""How localization sweeps score images: CLIP-scores, and the toy judge's zero-shot accuracy.

Every judge gives CLIP-scores (``clip_scores(images, prompts)``: raw cosine between each image
and its prompt), the papers' measure. The toy world's judge can also *classify* an image into a
scene (object, colour, style), which is far more telling than a raw cosine on a 32×32 image:
"does this image show the van gogh style?" has a yes/no answer. ``presence`` turns a phrase of
the toy world ("van gogh", "snoopy", "king charles", "a dog") into that yes/no per image; for a
judge that cannot classify, or a phrase the toy world does not know, it returns None and the
sweeps fall back to CLIP-scores alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from compiler.errors import UserError
from compiler.toy import world


class ImageJudge(Protocol):
    def clip_scores(self, images: np.ndarray, prompts: list[str]) -> np.ndarray: ...


def _scene_test(phrase: str) -> Callable[[world.Scene], bool] | None:
    """A test on a classified toy-world scene for ``phrase``, or None if the world lacks it."""
    phrase = " ".join(phrase.lower().split())
    if phrase in world.STYLES:
        return lambda scene: scene.style == phrase
    if phrase in world.CHARACTERS or phrase in world.PEOPLE:
        return lambda scene: scene.identity == phrase
    if phrase in world.FACTS:  # a title shows the person it names before any edit
        person = world.FACTS[phrase]
        return lambda scene: scene.identity == person
    for article in ("a ", "an ", "the "):
        phrase = phrase.removeprefix(article)
    if phrase in world.OBJECTS:
        return lambda scene: scene.identity == phrase
    return None


def fit_to_judge(judge, images: np.ndarray) -> np.ndarray:
    """Resize images to the judge's input size when a sweep ran at another resolution."""
    config = getattr(getattr(judge, "model", None), "config", None)
    size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if size is None or images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in images])


def clip_scores(judge, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """The judge's CLIP-score of each image against its prompt."""
    return np.asarray(judge.clip_scores(fit_to_judge(judge, images), list(prompts)), dtype=np.float64)


def can_judge_presence(judge, phrase: str) -> bool:
    return hasattr(judge, "classify") and _scene_test(phrase) is not None


def presence(judge, images: np.ndarray, phrase: str) -> np.ndarray | None:
    """Per image, does the judge see ``phrase`` in it? (float 0/1; None if it cannot tell)."""
    test = _scene_test(phrase)
    if test is None or not hasattr(judge, "classify"):
        return None
    return np.array([float(test(scene)) for scene in judge.classify(fit_to_judge(judge, images))],
                    dtype=np.float64)


class ClipFolderJudge:
    """CLIP-scores from a local transformers CLIP folder (for real checkpoints).

    Images are resized to the vision tower's input size and normalized with the folder's
    ``preprocessor_config.json`` statistics (OpenAI CLIP's when it has none).
    """

    _OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
    _OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, folder: str | Path) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"--judge {folder}: not a CLIP model folder (no config.json); pass a "
                            f"local transformers CLIP folder")
        self.model = CLIPModel.from_pretrained(str(folder)).float().eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        self.size = int(self.model.config.vision_config.image_size)
        mean, std = self._OPENAI_MEAN, self._OPENAI_STD
        preprocessor = folder / "preprocessor_config.json"
        if preprocessor.is_file():
            config = json.loads(preprocessor.read_text())
            mean, std = config.get("image_mean", mean), config.get("image_std", std)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def _image_features(self, images: np.ndarray) -> torch.Tensor:
        from PIL import Image

        resized = np.stack([np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.BICUBIC))
                            for img in images])
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255
        out = self.model.get_image_features(pixel_values=(pixels - self.mean) / self.std)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out / out.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out / out.norm(dim=-1, keepdim=True)

    def clip_scores(self, images: np.ndarray, prompts: list[str], batch: int = 64) -> np.ndarray:
        scores = []
        for i in range(0, len(images), batch):
            image = self._image_features(images[i : i + batch])
            text = self._text_features(list(prompts[i : i + batch]))
            scores.append((image * text).sum(-1).numpy())
        return np.concatenate(scores) if scores else np.zeros(0)


def load_judge_for(model_path: str | Path, judge_dir: str | Path | None = None):
    """The judge for a model (a diffusers folder) and an optional ``--judge`` folder.

    A toy-world judge folder (``vision.safetensors``: the vision tower, which joins the
    pipeline's own text tower) is used for the embedded toy model and for any toy-world
    pipeline folder with a ``judge`` folder beside it; any other ``--judge`` is a local
    transformers CLIP folder. Without either, there is nothing to score images with.
    """
    from compiler.toy.judge import load_judge

    pipeline_dir = Path(model_path)
    toy_judge = Path(judge_dir) if judge_dir else pipeline_dir.parent / "judge"
    if (toy_judge / "vision.safetensors").is_file() and (pipeline_dir / "text_encoder").is_dir():
        return load_judge(pipeline_dir, toy_judge)
    if judge_dir:
        return ClipFolderJudge(judge_dir)
    raise UserError(f"{pipeline_dir}: no judge to score images with; pass --judge DIR, a local "
                    f"CLIP model folder (the toy model brings its own)")
