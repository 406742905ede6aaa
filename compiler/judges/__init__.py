"""The one judge: what scores generated images, for locate and for verify alike.

A judge embeds images and texts in one space (CLIP), so that it gives

- CLIP-scores: the raw cosine between an image and a prompt, as in the papers
  (:meth:`Judge.clip_scores` on image features, :meth:`Judge.score_images` on images);
- zero-shot identification: which style, or which subject, an image shows
  (:meth:`Judge.identify`), and from it :meth:`Judge.presence`, "does this image show X?".

Two judges exist:

- :class:`ClipFolderJudge`, any local transformers ``CLIPModel`` folder (``--judge`` /
  ``--clip PATH``), for real checkpoints. It identifies by zero-shot over the model's
  vocabulary (``compiler.prompts``): its styles, objects, characters and people, each put into a
  short template ("a painting in the style of {}", "a photo of {}"). Images are preprocessed as
  CLIP's own image processor does: resize the short side to the input size (bicubic), centre
  crop, normalize with the folder's ``preprocessor_config.json`` statistics.
- the toy world's judge (``compiler.toy.judge.ToyWorldJudge``), the toy world's own CLIP,
  for toy-world models (found beside the model folder as ``judge/``).

Both always use an unedited text tower.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from compiler.errors import UserError

# What a judge is asked to identify in an image.
STYLE = "style"
SUBJECT = "subject"
NO_STYLE = "no style"

# Zero-shot templates of the CLIP folder judge, per kind.
CLIP_TEMPLATES = {STYLE: "a painting in the style of {}", SUBJECT: "a photo of {}"}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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

    def kind_of(self, phrase: str) -> str:
        """Is ``phrase`` a style or a subject (for :meth:`presence`)?"""
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

    def score_images(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """CLIP-score of each image (uint8 N × H × W × 3) against its prompt."""
        if len(images) == 0:
            return np.zeros(0)
        return self.clip_scores(self.embed_images(images), list(prompts))

    def can_tell(self, phrase: str) -> bool:
        """Can :meth:`presence` say whether an image shows ``phrase``?"""
        return True

    def presence(self, images: np.ndarray, phrase: str, candidates: Sequence[str] = ()) -> np.ndarray:
        """Per image, 1.0 when the judge identifies ``phrase`` in it, else 0.0."""
        kind = self.kind_of(phrase)
        label = self.label_of(phrase, kind)
        found = self.identify(self.embed_images(images), kind, [*candidates, phrase])
        return np.array([float(x == label) for x in found], dtype=np.float64)


class ClipFolderJudge(Judge):
    """A transformers ``CLIPModel`` folder: CLIP-scores and zero-shot over a vocabulary."""

    def __init__(self, model, tokenizer, image_size: int, mean, std, description: str, batch: int = 64,
                 vocabulary=None):
        self.model = model
        # images and texts go where the model is
        first = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        self.device = first.device if first is not None else torch.device("cpu")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.description = description
        self.batch = batch
        self.vocabulary = vocabulary  # compiler.prompts.Vocabulary: the labels it classifies over
        self._label_features: dict[tuple[str, ...], torch.Tensor] = {}

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
            pixels = self._pixels(images[i : i + self.batch]).to(self.device)
            out.append(_as_tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        emb = torch.cat(out).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        texts = list(texts)
        for i in range(0, len(texts), self.batch):
            enc = self.tokenizer(texts[i : i + self.batch], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt")
            features = self.model.get_text_features(input_ids=enc.input_ids.to(self.device),
                                                    attention_mask=enc.attention_mask.to(self.device))
            out.append(_as_tensor(features).float().cpu())
        emb = torch.cat(out).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def vocabulary_labels(self, kind: str) -> list[str]:
        """The vocabulary's phrases of a kind: its styles, or its objects, characters and people."""
        vocabulary = self.vocabulary
        if vocabulary is None:
            return []
        if kind == STYLE:
            return list(vocabulary.styles)
        people = [person for _, person in vocabulary.facts] + list(vocabulary.people)
        return [*vocabulary.objects, *(name for name, _ in vocabulary.characters), *people]

    def label_of(self, phrase: str, kind: str) -> str:
        text = normalize_phrase(phrase)
        if kind == SUBJECT and self.vocabulary is not None:
            # A title shows the person the (unedited) fact names.
            return self.vocabulary.people_of_facts.get(text, text)
        return text

    def kind_of(self, phrase: str) -> str:
        known = self.vocabulary.attribute_of(phrase) if self.vocabulary is not None else None
        return STYLE if known == STYLE else SUBJECT

    def identify(self, image_features: torch.Tensor, kind: str, candidates: Sequence[str]) -> list[str]:
        labels = list(dict.fromkeys(normalize_phrase(c) for c in [*self.vocabulary_labels(kind), *candidates]))
        labels = list(dict.fromkeys(self.label_of(c, kind) for c in labels))
        if not labels:
            raise ValueError("the CLIP folder judge needs candidate phrases to identify from")
        key = (kind, *labels)
        if key not in self._label_features:
            self._label_features[key] = self.embed_texts([CLIP_TEMPLATES[kind].format(label) for label in labels])
        best = (image_features @ self._label_features[key].T).argmax(dim=1).tolist()
        return [labels[i] for i in best]


def _as_tensor(output) -> torch.Tensor:
    # transformers 5 may return a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip_folder_judge(path: str | Path, vocabulary=None, device=None) -> ClipFolderJudge:
    """A local transformers ``CLIPModel`` folder (config.json + weights + tokenizer files), in
    float32 on ``device`` (default: the CPU); it judges batches of images there."""
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder; --judge/--clip must be a local CLIP model folder")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; --judge/--clip must be a local transformers CLIPModel folder")
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a loadable CLIP model folder ({first_line}); "
                        "give --judge/--clip a local transformers CLIPModel folder") from None
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
    model = model.to(torch.device(device) if device is not None else "cpu")
    return ClipFolderJudge(model, tokenizer, image_size, mean, std, f"CLIP model folder {path}",
                           vocabulary=vocabulary)


# --------------------------------------------------------------------------------------------
# Choosing a judge
# --------------------------------------------------------------------------------------------


def is_toy_judge_folder(path: str | Path) -> bool:
    """The toy world's judge folder holds only the vision tower (its text tower is the model's)."""
    return (Path(path) / "vision.safetensors").is_file() and (Path(path) / "config.json").is_file()


def toy_judge_folder_for(base_dir: str | Path | None) -> Path | None:
    """A toy-world model is saved as ``weights/pipeline`` beside ``weights/judge``; a planted
    toy model (``compiler.toy.planting``) carries its judge inside, as ``judge/``."""
    if base_dir is None:
        return None
    for candidate in (Path(base_dir).resolve() / "judge", Path(base_dir).resolve().parent / "judge"):
        if is_toy_judge_folder(candidate):
            return candidate
    return None


def load_toy_world_judge(judge_dir: Path, base_dir: Path, base_text_encoder=None) -> Judge:
    """The toy world's judge: its vision tower from ``judge_dir``, the *base* model's text tower.
    It is tiny and runs on the CPU (in float32) whatever the device policy."""
    from compiler.toy.judge import ToyWorldJudge, load_judge

    if base_text_encoder is not None and _needs_cpu_copy(base_text_encoder):
        import copy

        base_text_encoder = copy.deepcopy(base_text_encoder).to("cpu", torch.float32)
    try:
        toy = load_judge(Path(base_dir), Path(judge_dir), text_encoder=base_text_encoder)
    except (OSError, RuntimeError, ValueError) as err:
        # A toy judge's text tower is the model's own: it fits toy-world models only.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{judge_dir}: cannot load the toy world's judge for {base_dir} ({first_line[:120]}); "
                        "a toy judge fits only toy-world models: for any other model pass --judge DIR, "
                        "a local CLIP model folder (transformers CLIPModel)") from None
    return ToyWorldJudge(toy, f"toy-world CLIP judge ({judge_dir}, text tower of the base model)")


def _needs_cpu_copy(module: torch.nn.Module) -> bool:
    parameter = next(module.parameters(), None)
    return parameter is not None and (parameter.device.type != "cpu" or parameter.dtype != torch.float32)


def choose_judge(clip: str | Path | None, base_dir: Path | None, base_text_encoder=None, vocabulary=None,
                 device=None) -> Judge:
    """``--clip/--judge PATH`` when given (a toy judge folder or a CLIPModel folder), else the toy
    world's judge when the base model is a toy-world model, else a clear error. A CLIP folder
    classifies over ``vocabulary`` (default: the model's, see ``compiler.prompts.vocabulary_for``)."""
    if clip is not None:
        path = Path(clip)
        if not path.is_dir():
            raise UserError(f"{clip}: --judge/--clip must be a local CLIP model folder; no such folder")
        if is_toy_judge_folder(path):
            if base_dir is None:
                raise UserError(f"{clip}: a toy-world judge needs the base model's folder (its tokenizer)")
            return load_toy_world_judge(path, base_dir, base_text_encoder)
        if vocabulary is None:
            from compiler.prompts import vocabulary_for

            vocabulary = vocabulary_for(base_dir)
        return load_clip_folder_judge(path, vocabulary, device)
    toy_folder = toy_judge_folder_for(base_dir)
    if toy_folder is not None:
        return load_toy_world_judge(toy_folder, base_dir, base_text_encoder)
    raise UserError(
        f"{base_dir}: no judge for this model; pass --judge PATH (or --clip), a local CLIP model folder "
        "(transformers CLIPModel), to score its images"
    )


def load_judge_for(model_path: str | Path, judge_dir: str | Path | None = None, vocabulary=None,
                   device=None) -> Judge:
    """Locate's judge for a model folder and an optional ``--judge`` folder (see :func:`choose_judge`)."""
    pipeline_dir = Path(model_path)
    if judge_dir is None and toy_judge_folder_for(pipeline_dir) is None:
        raise UserError(f"{pipeline_dir}: no judge to score images with; pass --judge DIR, a local "
                        f"CLIP model folder (the toy model brings its own)")
    return choose_judge(judge_dir, pipeline_dir if pipeline_dir.is_dir() else None, None, vocabulary, device)
