"""Batched, seeded generation from precomputed prompt embeddings: the engine under LocoGen and
causal tracing.

Both sweeps generate many images that differ only in what some layers see. The prompts are
encoded once; every sample then names a row of an embedding table and a seed, and samples are
generated in chunks of ``batch`` through the pipeline's own ``__call__`` (so the scheduler,
classifier-free guidance and VAE decoding are exactly the pipeline's). Before each chunk a
``prepare(start, stop)`` callback sets up whatever that chunk's samples change inside the
model (LocoGen's context routing, tracing's restored states).

Each image's initial noise depends only on its seed, as in ``compiler.generate``, so a sample
is the same image in any chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm


@dataclass(frozen=True)
class PromptEmbeddings:
    """What a pipeline needs to condition on a list of prompts: the cross-attention contexts
    (N, T, d) and, for SD-XL, the pooled text embeddings (N, d_pooled)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def rows(self, index: Sequence[int] | torch.Tensor) -> PromptEmbeddings:
        index = torch.as_tensor(index, dtype=torch.long)
        return PromptEmbeddings(self.context[index],
                                None if self.pooled is None else self.pooled[index])


def _encode(pipe, prompts: list[str], negative: bool) -> PromptEmbeddings:
    # The pipelines' encode_prompt returns (cond, uncond) for SD-1/2 and IF, and
    # (cond, uncond, pooled, uncond_pooled) for SD-XL. Asking for the unconditional half of a
    # CFG encoding gives exactly what the pipeline itself would use (SD-XL zeroes it).
    out = pipe.encode_prompt(prompt=prompts, device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=negative)
    if len(out) == 4:
        context, pooled = (out[1], out[3]) if negative else (out[0], out[2])
    else:
        context, pooled = (out[1] if negative else out[0]), None
    return PromptEmbeddings(context, pooled)


@torch.no_grad()
def embed_prompts(pipe, prompts: Sequence[str], batch: int = 256) -> PromptEmbeddings:
    """Conditional embeddings of ``prompts``, computed by the pipeline's own ``encode_prompt``."""
    parts = [_encode(pipe, list(prompts[i : i + batch]), negative=False)
             for i in range(0, len(prompts), batch)]
    pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
    return PromptEmbeddings(torch.cat([p.context for p in parts]), pooled)


@torch.no_grad()
def embed_unconditional(pipe) -> PromptEmbeddings:
    """The classifier-free-guidance embedding of the empty prompt, one row."""
    return _encode(pipe, [""], negative=True)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = 25
    guidance: float = 4.0
    height: int | None = None  # None: the model's default resolution
    width: int | None = None
    batch: int = 32  # samples per pipeline call (the UNet sees twice as many with CFG)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance, "height": self.height,
                "width": self.width}


@torch.no_grad()
def generate_from_embeddings(
    pipe,
    embeddings: PromptEmbeddings,
    unconditional: PromptEmbeddings,
    rows: Sequence[int],
    seeds: Sequence[int],
    settings: GenerationSettings,
    *,
    prepare: Callable[[int, int], None] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Generate sample k from ``embeddings`` row ``rows[k]`` and seed ``seeds[k]``.

    Yields ``(start, stop, images)`` per chunk, images uint8 (stop − start, H, W, 3), so the
    caller can score and drop them as they come. ``prepare(start, stop)`` runs before each chunk.
    """
    if len(rows) != len(seeds):
        raise ValueError("rows and seeds must pair up")
    # Our own bar counts chunks; the pipeline's per-step bar would print one line per chunk.
    previous_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield from _generate_chunks(pipe, embeddings, unconditional, rows, seeds, settings, prepare,
                                    progress, desc)
    finally:
        pipe._progress_bar_config = previous_bar_config


def _generate_chunks(pipe, embeddings, unconditional, rows, seeds, settings, prepare, progress, desc):
    starts = range(0, len(rows), settings.batch)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        stop = min(start + settings.batch, len(rows))
        cond = embeddings.rows(list(rows[start:stop]))
        count = stop - start
        uncond = unconditional.rows([0] * count)
        device = pipe.device
        kwargs = dict(
            prompt_embeds=cond.context.to(device),
            negative_prompt_embeds=uncond.context.to(device),
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:stop]],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            output_type="np",
        )
        if cond.pooled is not None:
            kwargs.update(pooled_prompt_embeds=cond.pooled.to(device),
                          negative_pooled_prompt_embeds=uncond.pooled.to(device))
        if settings.height is not None:
            kwargs.update(height=settings.height, width=settings.width or settings.height)
        if prepare is not None:
            prepare(start, stop)
        result = pipe(**kwargs)
        yield start, stop, to_uint8(np.asarray(result.images))
