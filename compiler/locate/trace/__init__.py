"""Causal tracing (Basu et al., ICLR 2024): which states carry a concept from prompt to image.

Corrupt the prompt: add Gaussian noise to the input (token) embeddings of the subject's tokens,
with standard deviation ``noise_scale`` (3) × the empirical std of token embeddings, so the
image loses the subject. Then, in the corrupted run, restore one state to its value in the
clean run and measure how much of the subject comes back:

- **text encoder** (``trace_text_encoder``): one component's output at one token, for every
  layer × token; components are the layer's output (the residual stream, ``layer``), its
  self-attention output (``attn``) and its MLP output (``mlp``). The paper found one causal
  state in SD-1.5's CLIP text encoder: the first self-attention layer at the last subject token.
- **UNet** (``trace_unet``): one block's output (down/mid/up blocks, or every attention block)
  at every denoising step, in the conditional branch of classifier-free guidance only (the
  unconditional branch never sees the prompt). The paper found knowledge spread over many.

Recovery of a state = (restored − corrupted) / (clean − corrupted), by the judge's rate of the
subject (when the judge can classify it, the toy world's) and by the CLIP-score of the prompt.

All restorations of a trace run as one batched sweep: every sample of a batch carries its own
(component, layer, token) or (block), and hooks restore exactly that for exactly that sample.

Modules: ``text`` (the text-encoder tracer), ``unet`` (the UNet tracer), ``common`` (tokens,
corruption, the batched sweep, recovery, cache and JSON shared by both).
"""

from __future__ import annotations

import json
from pathlib import Path

from compiler.locate.trace.common import SCHEMA_VERSION, PromptTokens, prompt_tokens, token_embedding_std
from compiler.locate.trace.text import (TEXT_COMPONENTS, TextEncoderTracer, TextTraceResult, text_heatmap_panels,
                                        trace_text_encoder)
from compiler.locate.trace.unet import (UNET_GRANULARITIES, UNetTracer, UNetTraceResult, trace_unet,
                                        unet_components, unet_heatmap_panels)

__all__ = [
    "SCHEMA_VERSION", "TEXT_COMPONENTS", "UNET_GRANULARITIES", "PromptTokens", "TextEncoderTracer",
    "TextTraceResult", "UNetTraceResult", "UNetTracer", "prompt_tokens", "text_heatmap_panels",
    "token_embedding_std", "trace_text_encoder", "trace_unet", "unet_components", "unet_heatmap_panels",
    "write_trace_outputs",
]


def write_trace_outputs(text: TextTraceResult | None, unet: UNetTraceResult | None, folder: Path) -> list[Path]:
    """``trace.json`` (both traces) and ``text_encoder.png`` / ``unet.png`` into ``folder``."""
    from compiler.locate.heatmap import save_heatmaps

    folder = Path(folder)
    payload = {"schema_version": SCHEMA_VERSION, "kind": "trace",
               "text_encoder": text.to_dict() if text else None, "unet": unet.to_dict() if unet else None}
    (folder / "trace.json").write_text(json.dumps(payload, indent=2))
    written = [folder / "trace.json"]
    if text is not None:
        save_heatmaps(text_heatmap_panels(text), folder / "text_encoder.png")
        written.append(folder / "text_encoder.png")
    if unet is not None:
        save_heatmaps(unet_heatmap_panels(unet), folder / "unet.png", cell=44)
        written.append(folder / "unet.png")
    return written
