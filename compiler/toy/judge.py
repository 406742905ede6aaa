"""The toy world's judge: its trained CLIP model as zero-shot classifier and CLIP-scorer.

Zero-shot classification takes the argmax over *full* canonical captions (object, colour and
style at once, ``world.canonical_captions``), which the design brief measured to be far more
reliable than single-attribute prompts; each attribute is then read off the winning caption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compiler.errors import UserError
from compiler.judges import NO_STYLE, STYLE, SUBJECT, normalize_phrase
from compiler.judges import Judge as JudgeInterface
from compiler.toy import JUDGE_DIR, PIPELINE_DIR, world


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class Judge:
    model: object  # transformers.CLIPModel
    tokenizer: object
    labels: list[world.Scene]
    label_embeds: torch.Tensor  # (labels, dim), unit norm
    # Planted words (``compiler.toy.planting``): word -> the world's phrase it shows.
    aliases: dict[str, str] = field(default_factory=dict)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray, batch: int = 256) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> unit-norm image embeddings."""
        out = []
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
            out.append(_features(self.model.get_image_features(pixel_values=x)))
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch: int = 512) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tokenizer(texts[i : i + batch], padding=True, return_tensors="pt")
            out.append(_features(self.model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)))
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def classify(self, images: np.ndarray) -> list[world.Scene]:
        sims = self.embed_images(images) @ self.label_embeds.T
        return [self.labels[i] for i in sims.argmax(dim=1).tolist()]

    def clip_scores(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Raw cosine between each image and its prompt (the papers' CLIP-score, unscaled)."""
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(-1).numpy()

    def resolve_alias(self, phrase: str) -> str:
        """A planted word stands for its donor; anything else for itself."""
        return self.aliases.get(" ".join(phrase.lower().split()), phrase)

    def can_tell(self, phrase: str) -> bool:
        return scene_test(self.resolve_alias(phrase)) is not None

    def presence(self, images: np.ndarray, phrase: str, candidates: Sequence[str] = ()) -> np.ndarray:
        """Per image, does it show ``phrase`` (a style, character, person, title or object)?"""
        test = scene_test(self.resolve_alias(phrase))
        if test is None:
            raise ValueError(f"the toy world knows no {phrase!r}")
        return np.array([float(test(scene)) for scene in self.classify(images)], dtype=np.float64)


def scene_test(phrase: str) -> Callable[[world.Scene], bool] | None:
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


def load_judge(pipeline_dir: Path = PIPELINE_DIR, judge_dir: Path = JUDGE_DIR, text_encoder=None) -> Judge:
    """Join the judge's vision tower with the text tower it shares with the pipeline.

    ``text_encoder`` lets a caller pass the *base* model's text encoder explicitly; by default
    it is read from ``pipeline_dir``. The judge must always use the unedited text tower: a judge
    folder that brings its own (``text_model.safetensors``, a planted model's) uses that one.
    A judge folder's ``aliases.json`` (word -> phrase) names planted words.
    """
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    model = CLIPModel(CLIPConfig.from_pretrained(str(judge_dir))).float()
    state = _load_safetensors(judge_dir / "vision.safetensors")
    own_text = judge_dir / "text_model.safetensors"
    if own_text.is_file():
        text_state = _load_safetensors(own_text)
    elif text_encoder is None:
        text_state = _load_safetensors(pipeline_dir / "text_encoder" / "model.safetensors")
    else:
        text_state = text_encoder.state_dict()
    for key, value in text_state.items():
        state["text_model." + key.removeprefix("text_model.")] = value
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"judge weights do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(pipeline_dir / "tokenizer"))
    labelled = world.canonical_captions()
    judge = Judge(model, tokenizer, [scene for _, scene in labelled], torch.empty(0))
    judge.label_embeds = judge.embed_texts([text for text, _ in labelled])
    aliases = judge_dir / "aliases.json"
    if aliases.is_file():
        judge.aliases = {" ".join(k.lower().split()): v for k, v in json.loads(aliases.read_text()).items()}
    return judge


class ToyWorldJudge(JudgeInterface):
    """The toy world's CLIP behind the one judge interface (``compiler.judges``): zero-shot over
    every canonical caption of the world, so it knows every style, object, character and
    person, and each fact's outdated person ("the british monarch" shows queen elizabeth)."""

    is_toy_world = True

    def __init__(self, toy_judge: Judge, description: str):
        self.toy = toy_judge
        self.description = description

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        return self.toy.embed_images(images).float()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.toy.embed_texts(list(texts)).float()

    def _resolved(self, phrase: str) -> str:
        """A planted word as the concept it stands for (``aliases.json``); a labels-only judge
        (no toy model) has no aliases."""
        return phrase if self.toy is None else self.toy.resolve_alias(phrase)

    def kind_of(self, phrase: str) -> str:
        return STYLE if normalize_phrase(self._resolved(phrase)) in world.STYLES else SUBJECT

    def can_tell(self, phrase: str) -> bool:
        return self.toy.can_tell(phrase)

    def presence(self, images: np.ndarray, phrase: str, candidates: Sequence[str] = ()) -> np.ndarray:
        return self.toy.presence(images, phrase)

    def label_of(self, phrase: str, kind: str) -> str:
        text = normalize_phrase(self._resolved(phrase))
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
