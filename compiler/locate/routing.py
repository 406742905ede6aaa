"""Per-sample context routing for the UNet's cross-attention layers (LocoGen's altered inputs).

LocoGen asks: if the cross-attention layers ``j … j+m−1`` see the prompt *without* the
attribute (c′) while every other layer sees the original prompt (c), does the attribute vanish
from the image? Each window needs its own generation, so a sweep over every window is many
generations. To run them in few UNet forwards, every sample of a batch carries its own window:
a ``ContextRouting`` holds, per sample, the alternative context c′ and a boolean mask over the
cross-attention layers, and a ``RoutedContextProcessor`` wrapped around each layer's attention
processor swaps c′ in for exactly the samples whose mask covers that layer.

Only the conditional branch of classifier-free guidance is routed: the pipeline concatenates
``[unconditional, conditional]`` contexts, so the conditional samples are the last ``B`` rows
of the batch, and the unconditional rows pass through untouched.

On top of that: generation with per-sample windows (``routed_generation``), what LocoGen's
sweep runs on each rank (``run_routed``, scored by ``compiler.locate.scoring``) and how the
ranks' results are merged (``merge_ranks``), and ``generate_with_windows`` for tools and tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from compiler.locate.engine import (
    GenerationSettings,
    PromptEmbeddings,
    embed_prompts,
    embed_unconditional,
    generate_from_embeddings,
)
from compiler.locate.scoring import clip_scores, presence
from compiler.models.families import LayerWindow


@dataclass(frozen=True)
class CrossAttentionModule:
    """One cross-attention layer: its papers' index, module name and ``Attention`` module."""

    index: int
    name: str
    module: torch.nn.Module


def cross_attention_modules(unet: torch.nn.Module) -> list[CrossAttentionModule]:
    """The UNet's cross-attention layers numbered 0…M−1 in the string-sorted order of their
    module names: the papers' numbering, and the one ``compiler.models.registry`` uses (for
    SD-1.5: down_blocks.0–2 → 0–5, mid_block → 6, up_blocks.1–3 → 7–15).

    SD-style UNets name them ``…attn2``; DeepFloyd IF's added-KV attention layers have no
    ``attn2`` but carry ``add_k_proj``. Works on a bare UNet, so tests and tools need no
    ``LoadedModel``.
    """
    found = []
    for name, module in unet.named_modules():
        if not hasattr(module, "set_processor"):
            continue
        if name.endswith("attn2") or getattr(module, "add_k_proj", None) is not None:
            found.append((name, module))
    found.sort(key=lambda item: item[0])
    return [CrossAttentionModule(i, name, module) for i, (name, module) in enumerate(found)]


class ContextRouting:
    """Which samples of the running batch see c′ in which cross-attention layers.

    ``alternative`` is (B, T, d): the context c′ of each conditional sample. ``layer_mask`` is
    (B, M) bool: ``layer_mask[b, i]`` says that layer i gives sample b the context c′.
    """

    def __init__(self) -> None:
        self.alternative: torch.Tensor | None = None
        self.layer_mask: torch.Tensor | None = None

    def set(self, alternative: torch.Tensor, layer_mask: torch.Tensor) -> None:
        if alternative.shape[0] != layer_mask.shape[0]:
            raise ValueError("alternative contexts and layer masks must have one row per sample")
        self.alternative = alternative
        self.layer_mask = layer_mask.bool()

    def clear(self) -> None:
        self.alternative = None
        self.layer_mask = None

    def route(self, layer_index: int, context: torch.Tensor) -> torch.Tensor:
        """``context`` with the conditional rows swapped to c′ where the mask says so."""
        if self.alternative is None:
            return context
        chosen = self.layer_mask[:, layer_index].to(context.device)
        if not bool(chosen.any()):
            return context  # nothing routed here: the layer computes exactly what it would
        conditional_rows = self.alternative.shape[0]
        if context.shape[0] < conditional_rows:
            raise RuntimeError(f"the UNet batch has {context.shape[0]} contexts but routing holds "
                               f"{conditional_rows} samples")
        # With CFG the batch is [unconditional B, conditional B]; without it, conditional only.
        offset = context.shape[0] - conditional_rows
        alternative = self.alternative.to(device=context.device, dtype=context.dtype)
        conditional = torch.where(chosen[:, None, None], alternative, context[offset:])
        return torch.cat([context[:offset], conditional])


class RoutedContextProcessor:
    """Wraps a layer's attention processor; hands it the routed context instead of c."""

    def __init__(self, inner, layer_index: int, routing: ContextRouting) -> None:
        self.inner = inner
        self.layer_index = layer_index
        self.routing = routing

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        if encoder_hidden_states is not None:
            encoder_hidden_states = self.routing.route(self.layer_index, encoder_hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, temb=temb, **kwargs)


@contextmanager
def routed_cross_attention(unet: torch.nn.Module) -> Iterator[tuple[ContextRouting, int]]:
    """Install routing on every cross-attention layer; restore the old processors on exit.

    Yields the ``ContextRouting`` to fill before each pipeline call, and the number of layers M.
    With nothing set, every layer computes exactly what it computed before.
    """
    routing = ContextRouting()
    layers = cross_attention_modules(unet)
    originals = [layer.module.processor for layer in layers]
    try:
        for layer, inner in zip(layers, originals):
            layer.module.set_processor(RoutedContextProcessor(inner, layer.index, routing))
        yield routing, len(layers)
    finally:
        for layer, inner in zip(layers, originals):
            layer.module.set_processor(inner)
        routing.clear()


# ----------------------------------------------------------------------------- routed generation
def window_masks(windows: list[LayerWindow | None], num_layers: int) -> torch.Tensor:
    """(len(windows), num_layers) bool: row k covers the layers of ``windows[k]`` (None: none)."""
    masks = torch.zeros(len(windows), num_layers, dtype=torch.bool)
    for k, window in enumerate(windows):
        if window is not None:
            if window.start < 0 or window.start + window.size > num_layers:
                raise ValueError(f"window {window} does not fit in {num_layers} layers")
            masks[k, window.start : window.start + window.size] = True
    return masks


def routed_generation(pipe, embeddings: PromptEmbeddings, alternative: PromptEmbeddings, unconditional,
                      rows: list[int], seeds: list[int], sample_masks: torch.Tensor,
                      generation: GenerationSettings, on_chunk, *, progress: bool, desc: str) -> None:
    """``generate_from_embeddings`` with routing installed: sample k is prompt row ``rows[k]``
    with seed ``seeds[k]``, and the layers of ``sample_masks[k]`` see that row's alternative
    context. ``on_chunk(start, stop, images)`` gets each chunk while the routing is in place."""
    with routed_cross_attention(pipe.unet) as (routing, _):
        def prepare(start: int, stop: int) -> None:
            routing.set(alternative.context[rows[start:stop]], sample_masks[start:stop])

        for start, stop, images in generate_from_embeddings(pipe, embeddings, unconditional, rows, seeds,
                                                            generation, prepare=prepare, progress=progress,
                                                            desc=desc):
            on_chunk(start, stop, images)


def run_routed(pipe, samples, local, masks, embeddings: PromptEmbeddings, alternative: PromptEmbeddings,
               unconditional, score_prompts, judge, judged_phrase, generation, *, keep_windows,
               progress, desc):
    """Generate this rank's samples with per-sample windows; score them; keep some images.

    ``samples`` are (window row of ``masks``, prompt index, seed). Returns {sample: clip},
    {sample: rate}, {sample: image} for the samples in ``local``; nothing is scored without
    ``score_prompts``, no rate without ``judged_phrase``.
    """
    rows = [samples[k][1] for k in local]
    seeds = [samples[k][2] for k in local]
    sample_masks = masks[[samples[k][0] for k in local]] if local else masks[:0]
    clip, rate, kept = {}, {}, {}

    def take(start: int, stop: int, images: np.ndarray) -> None:
        chunk = local[start:stop]
        if score_prompts is not None:
            clips = clip_scores(judge, images, [score_prompts[samples[k][1]] for k in chunk])
            rates = presence(judge, images, judged_phrase) if judged_phrase else None
            for i, k in enumerate(chunk):
                clip[k] = float(clips[i])
                rate[k] = float(rates[i]) if rates is not None else math.nan
        for i, k in enumerate(chunk):
            if samples[k][0] in keep_windows:
                kept[k] = images[i]

    routed_generation(pipe, embeddings, alternative, unconditional, rows, seeds, sample_masks, generation, take,
                      progress=progress, desc=desc)
    return clip, rate, kept


def merge_ranks(group, count, clip, rate, kept):
    """Every rank's per-sample results, as arrays over all samples (and the kept images)."""
    parts = group.gather((clip, rate, kept))
    merged_kept = {}
    for _, _, part in parts:
        merged_kept.update(part)
    if clip is None:
        return None, None, merged_kept
    clip_all = np.full(count, np.nan)
    rate_all = np.full(count, np.nan)
    for part_clip, part_rate, _ in parts:
        for k, v in part_clip.items():
            clip_all[k] = v
        for k, v in part_rate.items():
            rate_all[k] = v
    return clip_all, rate_all, merged_kept


def generate_with_windows(pipe, prompts: list[str], alternative_prompts: list[str], seeds: list[int],
                          windows: list[LayerWindow | None], generation: GenerationSettings = GenerationSettings(),
                          *, progress: bool = False) -> np.ndarray:
    """One image per sample k: prompt ``prompts[k]``, seed ``seeds[k]``, and the layers of
    ``windows[k]`` fed ``alternative_prompts[k]`` (None: no layer, the clean image).

    The routed generation LocoGen's sweep runs, for one explicit list of samples (tools, tests).
    """
    if not len(prompts) == len(alternative_prompts) == len(seeds) == len(windows):
        raise ValueError("prompts, alternative prompts, seeds and windows must pair up")
    masks = window_masks(windows, len(cross_attention_modules(pipe.unet)))
    embeddings = embed_prompts(pipe, prompts)
    alternative = embed_prompts(pipe, alternative_prompts)
    unconditional = embed_unconditional(pipe)
    out = []
    routed_generation(pipe, embeddings, alternative, unconditional, list(range(len(prompts))), seeds, masks,
                      generation, lambda start, stop, images: out.append(images), progress=progress,
                      desc="windows")
    return np.concatenate(out)
