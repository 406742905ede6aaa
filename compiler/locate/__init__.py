"""Locate: where a model keeps a piece of knowledge.

- ``locogen``: LocoGen's window search over the UNet's cross-attention layers (``locate``);
  ``scoring`` scores its windows and picks the winner.
- ``trace``: causal tracing of the text encoder and the UNet (``trace_text_encoder``,
  ``trace_unet``).
- ``routing``: the per-sample attention processor that feeds chosen layers another context,
  and generation with per-sample windows (``generate_with_windows``).
- ``engine``: batched seeded generation from precomputed embeddings.
- ``cache``: results on disk, keyed by (model hash, concept, attribute, settings).
- ``heatmap``: PNG heat maps and image grids drawn with PIL.
- ``distributed``: sharding the samples of a sweep over ``torchrun`` processes.
"""

from compiler.locate.locogen import (
    LocateResult,
    LocateSettings,
    WindowScore,
    locate,
    locate_cached,
    write_outputs,
)
from compiler.locate.routing import cross_attention_modules, generate_with_windows, routed_cross_attention
from compiler.locate.trace import (
    TextTraceResult,
    UNetTraceResult,
    trace_text_encoder,
    trace_unet,
    write_trace_outputs,
)

__all__ = [
    "LocateResult",
    "LocateSettings",
    "TextTraceResult",
    "UNetTraceResult",
    "WindowScore",
    "cross_attention_modules",
    "generate_with_windows",
    "locate",
    "locate_cached",
    "routed_cross_attention",
    "trace_text_encoder",
    "trace_unet",
    "write_outputs",
    "write_trace_outputs",
]
