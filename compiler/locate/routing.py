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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


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
