"""Judges: what scores the generated images.

A judge embeds images and texts in one space (CLIP), so that it can give

- CLIP-scores: the raw cosine between an image and a prompt, as in the papers;
- zero-shot identification: which style, or which subject, an image shows.

Two judges exist:

- :class:`ToyWorldJudge`, the toy world's own CLIP (``compiler.toy.judge``). It classifies over
  the world's full canonical captions, so it knows every style, object, character and person,
  and it knows each fact's outdated person ("the british monarch" shows queen elizabeth).
- :class:`ClipFolderJudge`, any local transformers ``CLIPModel`` folder (``--judge PATH``), for
  real checkpoints. It identifies by zero-shot over candidate phrases put into a short template
  ("a photo of {}", "a painting in the style of {}").

Both always use an unedited text tower: the toy judge takes the *base* model's text encoder
(an edited checkpoint may have an edited text encoder, which would judge its own edit).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from compiler.errors import UserError
from compiler.toy import world

# What a judge is asked to identify in an image.
STYLE = "style"
SUBJECT = "subject"
NO_STYLE = "no style"

_ARTICLES = ("a ", "an ")


def normalize_phrase(phrase: str) -> str:
    """How phrases are compared: lower case, whitespace collapsed (CLIP lower-cases)."""
    return " ".join(phrase.split()).casefold()


class Judge:
    """The interface every judge implements (see the module docstring)."""

    description: str = ""
    is_toy_world: bool = False

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> unit-norm image features (N, d), float32."""
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> unit-norm text features (N, d), float32, from an unedited text tower."""
        raise NotImplementedError

    def label_of(self, phrase: str, kind: str) -> str:
        """The label :meth:`identify` gives an image that shows ``phrase`` (a style or subject)."""
        raise NotImplementedError

    def identify(self, image_features: torch.Tensor, kind: str, candidates: Sequence[str]) -> list[str]:
        """For each image, the label of the style or subject it shows.

        ``candidates`` are the phrases in play (a judge with a closed world may ignore them).
        """
        raise NotImplementedError

    def clip_scores(self, image_features: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        """Raw cosine between each image and its prompt (the papers' CLIP-score, unscaled)."""
        unique = list(dict.fromkeys(prompts))
        text_features = self.embed_texts(unique)
        rows = torch.tensor([unique.index(p) for p in prompts])
        return (image_features * text_features[rows]).sum(-1).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# The toy world's judge
# --------------------------------------------------------------------------------------------


class ToyWorldJudge(Judge):
    """The toy world's CLIP: zero-shot over every canonical caption of the world."""

    is_toy_world = True

    def __init__(self, toy_judge, description: str):
        self.toy = toy_judge  # compiler.toy.judge.Judge
        self.description = description

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        return self.toy.embed_images(images).float()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.toy.embed_texts(list(texts)).float()

    def label_of(self, phrase: str, kind: str) -> str:
        text = normalize_phrase(phrase)
        if kind == STYLE:
            if text in world.STYLES:
                return text
            raise UserError(
                f"the toy world's judge knows no style {phrase!r}; it knows {', '.join(world.STYLES)}"
            )
        if text in world.FACTS:  # a title shows the person the (unedited) fact names
            return world.FACTS[text]
        if text in world.CHARACTERS or text in world.PEOPLE:
            return text
        words = text.split()
        if words and words[0] in ("a", "an"):
            words = words[1:]
        if words and words[0] in world.COLOURS:
            words = words[1:]
        name = " ".join(words)
        if name in world.OBJECTS:
            return name
        known = [*world.OBJECTS, *world.CHARACTERS, *world.PEOPLE, *world.FACTS]
        raise UserError(f"the toy world's judge knows no subject {phrase!r}; it knows {', '.join(known)}")

    def identify(self, image_features: torch.Tensor, kind: str, candidates: Sequence[str] = ()) -> list[str]:
        scenes = self.classify(image_features)
        if kind == STYLE:
            return [scene.style or NO_STYLE for scene in scenes]
        return [scene.identity for scene in scenes]

    def classify(self, image_features: torch.Tensor) -> list[world.Scene]:
        best = (image_features @ self.toy.label_embeds.float().T).argmax(dim=1).tolist()
        return [self.toy.labels[i] for i in best]


def load_toy_world_judge(judge_dir: Path, base_dir: Path, base_text_encoder) -> ToyWorldJudge:
    """The toy judge: its vision tower from ``judge_dir``, the *base* model's text tower."""
    from compiler.toy.judge import load_judge

    try:
        toy = load_judge(Path(base_dir), Path(judge_dir), text_encoder=base_text_encoder)
    except (OSError, RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{judge_dir}: cannot load the toy world's judge ({first_line})") from None
    return ToyWorldJudge(toy, f"toy-world CLIP judge ({judge_dir}, text tower of the base model)")


# --------------------------------------------------------------------------------------------
# A local CLIP folder
# --------------------------------------------------------------------------------------------

# Zero-shot templates of the CLIP folder judge, per kind.
CLIP_TEMPLATES = {STYLE: "a painting in the style of {}", SUBJECT: "a photo of {}"}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipFolderJudge(Judge):
    """A transformers ``CLIPModel`` folder: CLIP-scores and zero-shot over candidate phrases."""

    def __init__(self, model, tokenizer, image_size: int, mean, std, description: str, batch: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.description = description
        self.batch = batch

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        """CLIP's preprocessing: resize the short side, centre crop, normalize."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        if (h, w) != (self.image_size, self.image_size):
            new_h, new_w = max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale))
            x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True,
                                                align_corners=False).clamp(0, 1)
            top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
            x = x[..., top : top + self.image_size, left : left + self.image_size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch):
            features = self.model.get_image_features(pixel_values=self._pixels(images[i : i + self.batch]))
            out.append(_as_tensor(features))
        emb = torch.cat(out).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        texts = list(texts)
        for i in range(0, len(texts), self.batch):
            enc = self.tokenizer(texts[i : i + self.batch], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt")
            features = self.model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
            out.append(_as_tensor(features))
        emb = torch.cat(out).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def label_of(self, phrase: str, kind: str) -> str:
        return normalize_phrase(phrase)

    def identify(self, image_features: torch.Tensor, kind: str, candidates: Sequence[str]) -> list[str]:
        labels = list(dict.fromkeys(normalize_phrase(c) for c in candidates))
        if not labels:
            raise ValueError("the CLIP folder judge needs candidate phrases to identify from")
        text_features = self.embed_texts([CLIP_TEMPLATES[kind].format(label) for label in labels])
        best = (image_features @ text_features.T).argmax(dim=1).tolist()
        return [labels[i] for i in best]


def _as_tensor(output) -> torch.Tensor:
    # transformers 5 may return a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip_folder_judge(path: Path) -> ClipFolderJudge:
    """A local transformers ``CLIPModel`` folder (config.json + weights + tokenizer files)."""
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(path)
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a loadable CLIP model folder ({first_line}); "
                        "give --judge a local transformers CLIPModel folder") from None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path}: the CLIP folder has no usable tokenizer files (vocab.json, merges.txt): "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean = tuple(settings.get("image_mean", mean))
        std = tuple(settings.get("image_std", std))
    image_size = int(model.config.vision_config.image_size)
    return ClipFolderJudge(model, tokenizer, image_size, mean, std, f"CLIP model folder {path}")


# --------------------------------------------------------------------------------------------
# Choosing a judge
# --------------------------------------------------------------------------------------------


def is_toy_judge_folder(path: Path) -> bool:
    """The toy world's judge folder holds only the vision tower (its text tower is the model's)."""
    return (Path(path) / "vision.safetensors").is_file() and (Path(path) / "config.json").is_file()


def toy_judge_folder_for(base_dir: Path | None) -> Path | None:
    """A toy-world model is saved as ``weights/pipeline`` beside ``weights/judge``."""
    if base_dir is None:
        return None
    candidate = Path(base_dir).resolve().parent / "judge"
    return candidate if is_toy_judge_folder(candidate) else None


def choose_judge(clip: str | Path | None, base_dir: Path | None, base_text_encoder) -> Judge:
    """``--judge PATH`` when given (a toy judge folder or a CLIPModel folder), else the toy
    world's judge when the base model is a toy-world model, else a clear error."""
    if clip is not None:
        path = Path(clip)
        if not path.is_dir():
            raise UserError(f"{clip}: --judge must be a local CLIP model folder; no such folder")
        if is_toy_judge_folder(path):
            if base_dir is None:
                raise UserError(f"{clip}: a toy-world judge needs the base model's folder (its tokenizer)")
            return load_toy_world_judge(path, base_dir, base_text_encoder)
        if not (path / "config.json").is_file():
            raise UserError(f"{clip}: no config.json; --judge must be a local transformers CLIPModel folder")
        return load_clip_folder_judge(path)
    toy_folder = toy_judge_folder_for(base_dir)
    if toy_folder is not None:
        return load_toy_world_judge(toy_folder, base_dir, base_text_encoder)
    raise UserError(
        f"{base_dir}: no judge for this model; pass --judge PATH, a local CLIP model folder "
        "(transformers CLIPModel), to score its images"
    )
