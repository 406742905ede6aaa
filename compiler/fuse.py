"""Fuse: write solved tensors back into a loaded pipeline, in the model's own dtype.

Names are *qualified* diffusers names, ``<component>/<parameter name>`` (for example
``unet/down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight``); nothing else in
the model changes.
"""

from __future__ import annotations

import torch


def split_name(qualified: str) -> tuple[str, str]:
    component, _, param = qualified.partition("/")
    if not param:
        raise ValueError(f"{qualified!r} is not '<component>/<parameter>'")
    return component, param


def get_parameter(pipe, qualified: str) -> torch.Tensor:
    component, param = split_name(qualified)
    return getattr(pipe, component).get_parameter(param)


@torch.no_grad()
def fuse_weights(pipe, new_tensors: dict[str, torch.Tensor]) -> None:
    """Copy each new tensor into the pipeline's parameter of that name (cast to its dtype)."""
    for qualified, value in new_tensors.items():
        target = get_parameter(pipe, qualified)
        if target.shape != value.shape:
            raise ValueError(f"{qualified}: new shape {tuple(value.shape)} != {tuple(target.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{qualified}: refusing to fuse NaN/Inf")
        target.copy_(value.to(device=target.device, dtype=target.dtype))
