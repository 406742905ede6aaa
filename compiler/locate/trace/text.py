"""Causal tracing of the text encoder: restore one component's clean output at one token."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from compiler.errors import UserError
from compiler.models.families import family_of_pipeline
from compiler.locate import cache
from compiler.locate.distributed import current_process_group
from compiler.locate.engine import GenerationSettings, PromptEmbeddings, embed_prompts, embed_unconditional
from compiler.locate.measure import Measurement
from compiler.locate.scoring import can_judge_presence
from compiler.locate.trace.common import (PromptTokens, SampleList, TraceResultJSON, cache_entry, cached_payload,
                                          corruption_noise, means_by_label, measure_label, prompt_tokens, recoveries,
                                          shared_result_fields, sweep, trace_settings)

TEXT_COMPONENTS = ("layer", "attn", "mlp")


def _encoder_layers(text_encoder) -> torch.nn.ModuleList:
    """The transformer layers of a CLIP text encoder, whatever the transformers version."""
    for name, module in text_encoder.named_modules():
        if name.endswith("encoder.layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise UserError(f"{type(text_encoder).__name__}: no encoder.layers; causal tracing of the text "
                    f"encoder supports CLIP text encoders")


def _component(layer: torch.nn.Module, component: str) -> torch.nn.Module:
    return {"layer": layer, "attn": layer.self_attn, "mlp": layer.mlp}[component]


def _replace_tokens(output, rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor):
    """``output`` (a tensor, or a tuple whose first item is it) with ``[rows, positions] = values``."""
    tensor = output[0] if isinstance(output, tuple) else output
    tensor = tensor.clone()
    tensor[rows, positions] = values.to(device=tensor.device, dtype=tensor.dtype)
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


class TextEncoderTracer:
    """Hooks on a text encoder: corrupt the subject's token embeddings with a per-sample noise,
    and restore per sample one (component, layer, token) to its clean value.

    ``plan(noise, restore)`` sets the batch about to be encoded: ``noise`` (B, n_subject, d) or
    None for a clean batch; ``restore`` a list of (component, layer, token) or None per sample.
    """

    def __init__(self, text_encoder, tokens: PromptTokens) -> None:
        self.text_encoder = text_encoder
        self.tokens = tokens
        self.layers = _encoder_layers(text_encoder)
        self.clean: dict[tuple[str, int], torch.Tensor] = {}  # (component, layer) -> (T, d)
        self.noise: torch.Tensor | None = None
        self.restore: list[tuple[str, int, int] | None] = []
        self.recording = False
        self.handles = []

    def __enter__(self) -> TextEncoderTracer:
        embedding = self.text_encoder.get_input_embeddings()
        self.handles.append(embedding.register_forward_hook(self._corrupt))
        for index, layer in enumerate(self.layers):
            for component in TEXT_COMPONENTS:
                hook = self._restorer(component, index)
                self.handles.append(_component(layer, component).register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def plan(self, noise: torch.Tensor | None, restore: list[tuple[str, int, int] | None]) -> None:
        self.noise, self.restore = noise, restore

    def _corrupt(self, module, args, output):
        if self.noise is None:
            return output
        first, last = self.tokens.subject_first, self.tokens.subject_last
        output = output.clone()
        output[:, first : last + 1] += self.noise.to(device=output.device, dtype=output.dtype)
        return output

    def _restorer(self, component: str, layer: int):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if self.recording:
                self.clean[(component, layer)] = tensor[0, : len(self.tokens.ids)].detach().clone()
                return output
            chosen = [(b, r[2]) for b, r in enumerate(self.restore)
                      if r is not None and r[0] == component and r[1] == layer]
            if not chosen:
                return output
            rows = torch.tensor([b for b, _ in chosen], device=tensor.device)
            positions = torch.tensor([t for _, t in chosen], device=tensor.device)
            return _replace_tokens(output, rows, positions, self.clean[(component, layer)][positions])
        return hook

    @torch.no_grad()
    def record_clean(self, pipe, prompt: str) -> PromptEmbeddings:
        self.recording, self.noise, self.restore = True, None, [None]
        try:
            return embed_prompts(pipe, [prompt])
        finally:
            self.recording = False


@dataclass(frozen=True)
class TextTraceResult(TraceResultJSON):
    KIND = "trace-text-encoder"

    prompt: str
    subject: str
    model_hash: str
    tokens: tuple[str, ...]  # labels, BOS … EOS
    subject_positions: tuple[int, int]  # first, last (BOS = 0)
    components: tuple[str, ...]
    num_layers: int
    clean: Measurement
    corrupted: Measurement
    # component -> [layer][token] (BOS column is NaN: its state never differs, see below)
    clip: dict
    rate: dict | None
    recovery: dict  # by the deciding measure: rate when the judge has it, else CLIP
    recovery_by: str  # "rate" or "clip"
    clip_recovery: dict  # by CLIP-score, always
    settings: dict
    timings: dict
    notes: tuple[str, ...] = ()
    cached: bool = False

    def strongest(self, by: str | None = None) -> tuple[str, int, int, float]:
        """(component, layer, token, recovery) of the state that brings back the most, by the
        deciding measure (``by=None``) or by CLIP-score (``by="clip"``)."""
        recovery = self.clip_recovery if by == "clip" else self.recovery
        best = ("", -1, -1, -math.inf)
        for component, grid in recovery.items():
            for layer, row in enumerate(grid):
                for token, value in enumerate(row):
                    if value is not None and not math.isnan(value) and value > best[3]:
                        best = (component, layer, token, value)
        return best



@torch.no_grad()
def trace_text_encoder(
    pipe,
    prompt: str,
    subject: str,
    *,
    judge,
    components: tuple[str, ...] = TEXT_COMPONENTS,
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    steps: int = 25,
    guidance: float = 4.0,
    height: int | None = None,
    width: int | None = None,
    noise_scale: float = 3.0,
    noise_samples: int = 1,
    noise_seed: int = 0,
    batch: int = 32,
    model_hash: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> TextTraceResult:
    """Trace every (component, layer, token) of the text encoder for ``prompt``'s ``subject``.

    Each of ``noise_samples`` corruptions is restored at every state and generated with every
    seed: components × layers × tokens × noise_samples × seeds samples, plus the references.
    """
    started = time.perf_counter()
    bad = [c for c in components if c not in TEXT_COMPONENTS]
    if bad or not components:
        raise UserError(f"text components must be among {', '.join(TEXT_COMPONENTS)}, got {bad or 'none'}")
    if len(family_of_pipeline(pipe).text_encoders) > 1:
        raise UserError("text-encoder tracing covers single-encoder models (SD-1.x, SD-2.x); SD-XL "
                        "has two encoders")
    tokens = prompt_tokens(pipe.tokenizer, prompt, subject)
    settings = trace_settings(pipe, prompt, subject, seeds, steps, guidance, height, width, noise_scale,
                               noise_samples, noise_seed)
    settings["components"] = list(components)
    group = current_process_group()
    model_hash = model_hash or cache.weights_fingerprint(pipe)
    entry = cache_entry("text", model_hash, settings)
    if use_cache:
        payload = cached_payload(entry, group)
        if payload is not None:
            return _text_result_from_dict(payload)

    judges_presence = can_judge_presence(judge, subject)
    timings = {}
    t0 = time.perf_counter()
    tracer = TextEncoderTracer(pipe.text_encoder, tokens)
    num_layers = len(tracer.layers)
    noise = corruption_noise(pipe, tokens, settings)
    # BOS is never corrupted and CLIP's attention is causal, so its state is the same in both
    # runs: restoring it cannot change anything, and it is not swept.
    positions = range(1, len(tokens.ids))
    cells = [(c, layer, t) for c in components for layer in range(num_layers) for t in positions]
    # Embedding table rows: 0 clean; 1…K corrupted; then one row per (noise, cell).
    with tracer:
        clean_row = tracer.record_clean(pipe, prompt)
        contexts = [clean_row]
        for k in range(noise_samples):
            tracer.plan(noise[k : k + 1], [None])
            contexts.append(embed_prompts(pipe, [prompt]))
        chunk = 256
        for k in range(noise_samples):
            for i in range(0, len(cells), chunk):
                part = cells[i : i + chunk]
                tracer.plan(noise[k].expand(len(part), -1, -1), list(part))
                contexts.append(embed_prompts(pipe, [prompt] * len(part)))
    embeddings = PromptEmbeddings(torch.cat([c.context for c in contexts]),
                                  None if contexts[0].pooled is None else torch.cat([c.pooled for c in contexts]))
    timings["encode_s"] = time.perf_counter() - t0

    # Samples: (table row, seed), each labelled with what it measures.
    samples = SampleList()
    for s in seeds:
        samples.add(0, s, "clean")
    for k in range(noise_samples):
        for s in seeds:
            samples.add(1 + k, s, "corrupted")
    for k in range(noise_samples):
        for i, cell in enumerate(cells):
            for s in seeds:
                samples.add(1 + noise_samples + k * len(cells) + i, s, cell)
    t0 = time.perf_counter()
    clip, rate = sweep(pipe, group, embeddings, embed_unconditional(pipe), samples.rows, samples.seeds,
                        GenerationSettings(steps, guidance, height, width, batch), judge, prompt, subject,
                        judges_presence, None, progress, f"trace text {subject}")
    timings["sweep_s"] = time.perf_counter() - t0

    means = means_by_label(samples.labels, clip, rate)
    clean = Measurement(means["clean"][0], means["clean"][1] if judges_presence else None)
    corrupted = Measurement(means["corrupted"][0], means["corrupted"][1] if judges_presence else None)
    clip_grid = {c: np.full((num_layers, len(tokens.ids)), np.nan) for c in components}
    rate_grid = {c: np.full((num_layers, len(tokens.ids)), np.nan) for c in components}
    for c, layer, t in cells:
        clip_grid[c][layer, t], rate_grid[c][layer, t] = means[(c, layer, t)]
    recovery_by, recovery_of, notes = recoveries(judges_presence, clean, corrupted)
    grids = {"clip": clip_grid, "rate": rate_grid}
    recovery = {c: recovery_of[recovery_by](grids[recovery_by][c]) for c in components}
    clip_recovery = {c: recovery_of["clip"](clip_grid[c]) for c in components}
    timings.update(samples=len(samples.rows), processes=group.world_size, total_s=time.perf_counter() - started)
    result = TextTraceResult(
        prompt=prompt, subject=subject, model_hash=model_hash, tokens=tuple(tokens.labels),
        subject_positions=(tokens.subject_first, tokens.subject_last), components=tuple(components),
        num_layers=num_layers, clean=clean, corrupted=corrupted,
        clip={c: clip_grid[c].tolist() for c in components},
        rate={c: rate_grid[c].tolist() for c in components} if judges_presence else None,
        recovery=recovery, recovery_by=recovery_by, clip_recovery=clip_recovery, settings=settings,
        timings={k: (round(v, 3) if isinstance(v, float) else v) for k, v in timings.items()},
        notes=tuple(notes),
    )
    if use_cache and group.is_main:
        cache.save_entry(entry, "trace.json", result.to_dict(), {})
    return result


def _text_result_from_dict(payload: dict) -> TextTraceResult:
    return TextTraceResult(**shared_result_fields(payload), tokens=tuple(payload["tokens"]),
                           subject_positions=tuple(payload["subject_positions"]), num_layers=payload["num_layers"])


def text_heatmap_panels(result: TextTraceResult):
    """Layer × token panels of recovery per traced component: by the deciding measure, and by
    CLIP-score when the rate decides (it shows partial recoveries a rate misses)."""
    from compiler.locate.heatmap import HeatmapPanel

    first, last = result.subject_positions
    tokens = [f"*{t}" if first <= i <= last else t for i, t in enumerate(result.tokens)]
    measures = [(result.recovery_by, result.recovery)]
    if result.recovery_by != "clip":
        measures.append(("clip", result.clip_recovery))
    panels = []
    for by, recovery in measures:
        for component in result.components:
            values = np.array(recovery[component], dtype=np.float64)
            finite = np.isfinite(values)
            highlight = np.unravel_index(np.nanargmax(values), values.shape) if finite.any() else None
            title = (f"text encoder {component} output restored at (layer, token): recovery of "
                     f"'{result.subject}' by {by} (clean {measure_label(result.clean, by)}, "
                     f"corrupted {measure_label(result.corrupted, by)})")
            panels.append(HeatmapPanel(title, values, [str(i) for i in range(result.num_layers)], tokens,
                                       "layer", "token (* = subject)", vmin=0.0, vmax=1.0,
                                       highlight=tuple(int(i) for i in highlight) if highlight else None))
    return panels
