"""The toy world's judge: its trained CLIP model as zero-shot classifier and CLIP-scorer.

Zero-shot classification takes the argmax over *full* canonical captions (object, colour and
style at once, ``world.canonical_captions``), which the design brief measured to be far more
reliable than single-attribute prompts; each attribute is then read off the winning caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


def load_judge(pipeline_dir: Path = PIPELINE_DIR, judge_dir: Path = JUDGE_DIR, text_encoder=None) -> Judge:
    """Join the judge's vision tower with the text tower it shares with the pipeline.

    ``text_encoder`` lets a caller pass the *base* model's text encoder explicitly; by default
    it is read from ``pipeline_dir``. The judge must always use the unedited text tower.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    model = CLIPModel(CLIPConfig.from_pretrained(str(judge_dir))).float()
    state = _load_safetensors(judge_dir / "vision.safetensors")
    if text_encoder is None:
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
    return judge
