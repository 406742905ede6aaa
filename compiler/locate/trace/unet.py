"""Causal tracing of the UNet: restore one block's clean output at every denoising step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from compiler.errors import UserError
from compiler.models.families import family_of_pipeline
from compiler.locate.distributed import current_process_group
from compiler.locate.engine import (GenerationSettings, PromptEmbeddings, embed_prompts, embed_unconditional,
                                    generate_from_embeddings)
from compiler.locate import cache
from compiler.locate.measure import Measurement
from compiler.locate.scoring import can_judge_presence
from compiler.locate.trace.common import (SampleList, TraceResultJSON, cache_entry, cached_payload, corruption_noise,
                                          judge_samples, means_by_label, measure_label, prompt_tokens, recoveries,
                                          shared_result_fields, sweep, trace_settings)
from compiler.locate.trace.text import TextEncoderTracer

UNET_GRANULARITIES = ("blocks", "attentions")


def unet_components(unet, granularity: str = "blocks") -> list[tuple[str, torch.nn.Module]]:
    """The UNet parts whose outputs a trace restores, in the order the UNet runs them.

    ``blocks``: down_blocks.*, mid_block, up_blocks.*. ``attentions``: every attention block
    (``….attentions.N``, a Transformer2DModel holding self- and cross-attention).
    """
    if granularity not in UNET_GRANULARITIES:
        raise UserError(f"UNet granularity must be one of {', '.join(UNET_GRANULARITIES)}, got {granularity!r}")
    modules = dict(unet.named_modules())
    prefixes = ([f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
                + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))])
    if granularity == "blocks":
        return [(name, modules[name]) for name in prefixes if modules.get(name) is not None]
    found = []
    for prefix in prefixes:
        count = len(getattr(modules.get(prefix), "attentions", None) or [])
        found.extend((f"{prefix}.attentions.{i}", modules[f"{prefix}.attentions.{i}"]) for i in range(count))
    return found


def _flatten(output) -> list[torch.Tensor]:
    """The tensors of a block's output, depth first (down blocks return (h, (skip, …)))."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _flatten(item)]
    raise TypeError(f"cannot trace a block output of type {type(output).__name__}")


def _unflatten(template, tensors: list[torch.Tensor]):
    """Rebuild ``template``'s structure from ``tensors`` (consumed from the front)."""
    if isinstance(template, torch.Tensor):
        return tensors.pop(0)
    return type(template)(_unflatten(item, tensors) for item in template)


class UNetTracer:
    """Hooks on UNet components: record their outputs in a clean generation, at every denoising
    step; in later generations, give each sample chosen by ``plan`` its clean output back.

    Only the conditional rows of a CFG batch are recorded and restored (the last B rows).
    """

    def __init__(self, unet, components: list[tuple[str, torch.nn.Module]]) -> None:
        self.unet = unet
        self.components = components
        self.recording = False
        self.step = -1
        self.clean: dict[str, list[list[torch.Tensor]]] = {}  # name -> step -> flat tensors (N, …)
        self.restore: list[str | None] = []  # per conditional sample of the running batch
        self.clean_index: list[int] = []  # per sample: its row among the recorded clean samples
        self.handles = []

    def __enter__(self) -> UNetTracer:
        self.handles.append(self.unet.register_forward_pre_hook(self._count_step))
        for name, module in self.components:
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def plan(self, restore: list[str | None], clean_index: list[int]) -> None:
        """Set the batch about to be generated; the step counter starts again."""
        self.restore, self.clean_index, self.step = list(restore), list(clean_index), -1

    def _count_step(self, module, args):
        self.step += 1

    def _hook(self, name: str):
        def hook(module, args, output):
            tensors = _flatten(output)
            batch = len(self.restore)
            offset = tensors[0].shape[0] - batch  # CFG: [unconditional B, conditional B]
            if self.recording:
                self.clean.setdefault(name, []).append([t[offset:].detach().clone() for t in tensors])
                return output
            rows = [b for b, r in enumerate(self.restore) if r == name]
            if not rows:
                return output
            recorded = self.clean[name][self.step]
            source = torch.tensor([self.clean_index[b] for b in rows])
            target = torch.tensor(rows) + offset
            restored = []
            for tensor, clean in zip(tensors, recorded):
                tensor = tensor.clone()
                tensor[target.to(tensor.device)] = clean[source.to(clean.device)].to(tensor.dtype)
                restored.append(tensor)
            return _unflatten(output, restored)
        return hook


@dataclass(frozen=True)
class UNetTraceResult(TraceResultJSON):
    KIND = "trace-unet"

    prompt: str
    subject: str
    model_hash: str
    granularity: str
    components: tuple[str, ...]  # in the order the UNet runs them
    clean: Measurement
    corrupted: Measurement
    clip: list  # per component
    rate: list | None
    recovery: list
    recovery_by: str
    clip_recovery: list
    settings: dict
    timings: dict
    notes: tuple[str, ...] = ()
    cached: bool = False

    def strongest(self, by: str | None = None) -> tuple[str, float]:
        """(component, recovery) of the block that brings back the most (see TextTraceResult)."""
        recovery = self.clip_recovery if by == "clip" else self.recovery
        values = [(-math.inf if v is None or math.isnan(v) else v) for v in recovery]
        best = int(np.argmax(values)) if values else 0
        return (self.components[best], values[best]) if values else ("", -math.inf)



@torch.no_grad()
def trace_unet(
    pipe,
    prompt: str,
    subject: str,
    *,
    judge,
    granularity: str = "blocks",
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
) -> UNetTraceResult:
    """Trace every UNet component for ``prompt``'s ``subject``: corrupt the subject's token
    embeddings, restore the component's clean output at every step, judge the images.

    The clean run is generated once per process, in one batch (its outputs at every step are
    what the restored runs get back); then components × noise_samples × seeds samples.
    """
    started = time.perf_counter()
    if len(family_of_pipeline(pipe).text_encoders) > 1:
        raise UserError("UNet tracing corrupts one CLIP text encoder's input; SD-XL has two")
    tokens = prompt_tokens(pipe.tokenizer, prompt, subject)
    components = unet_components(pipe.unet, granularity)
    settings = trace_settings(pipe, prompt, subject, seeds, steps, guidance, height, width, noise_scale,
                               noise_samples, noise_seed)
    settings["granularity"] = granularity
    group = current_process_group()
    model_hash = model_hash or cache.weights_fingerprint(pipe)
    entry = cache_entry("unet", model_hash, settings)
    if use_cache:
        payload = cached_payload(entry, group)
        if payload is not None:
            return _unet_result_from_dict(payload)

    judges_presence = can_judge_presence(judge, subject)
    timings = {}
    t0 = time.perf_counter()
    tracer = TextEncoderTracer(pipe.text_encoder, tokens)
    noise = corruption_noise(pipe, tokens, settings)
    with tracer:
        tables = [embed_prompts(pipe, [prompt])]  # row 0: clean; rows 1…K: corrupted
        for k in range(noise_samples):
            tracer.plan(noise[k : k + 1], [None])
            tables.append(embed_prompts(pipe, [prompt]))
    embeddings = PromptEmbeddings(torch.cat([t.context for t in tables]),
                                  None if tables[0].pooled is None else torch.cat([t.pooled for t in tables]))
    unconditional = embed_unconditional(pipe)
    timings["encode_s"] = time.perf_counter() - t0

    seeds = tuple(int(s) for s in seeds)
    generation = GenerationSettings(steps, guidance, height, width, batch)
    unet_tracer = UNetTracer(pipe.unet, components)
    t0 = time.perf_counter()
    with unet_tracer:
        # The clean run, recorded: one batch of all seeds on every process.
        unet_tracer.recording = True
        unet_tracer.plan([None] * len(seeds), list(range(len(seeds))))
        clean_generation = GenerationSettings(steps, guidance, height, width, batch=len(seeds))
        (_, _, clean_images), = list(generate_from_embeddings(pipe, embeddings, unconditional, [0] * len(seeds),
                                                              seeds, clean_generation, progress=False))
        unet_tracer.recording = False
        clip, rate = judge_samples(judge, clean_images, prompt, subject, judges_presence)
        clean = Measurement(float(clip.mean()), float(rate.mean()) if judges_presence else None)
        timings["clean_s"] = time.perf_counter() - t0

        samples = SampleList()
        for k in range(noise_samples):
            for i, s in enumerate(seeds):
                samples.add(1 + k, s, ("corrupted", i))
                for name, _ in components:
                    samples.add(1 + k, s, (name, i))

        def prepare(indices: list[int]) -> None:
            labels = [samples.labels[k] for k in indices]
            unet_tracer.plan([None if name == "corrupted" else name for name, _ in labels],
                             [seed_index for _, seed_index in labels])

        t0 = time.perf_counter()
        clip, rate = sweep(pipe, group, embeddings, unconditional, samples.rows, samples.seeds, generation,
                            judge, prompt, subject, judges_presence, prepare, progress, f"trace unet {subject}")
        timings["sweep_s"] = time.perf_counter() - t0

    means = means_by_label([name for name, _ in samples.labels], clip, rate)
    corrupted = Measurement(means["corrupted"][0], means["corrupted"][1] if judges_presence else None)
    names = [name for name, _ in components]
    clip_row = np.array([means[n][0] for n in names])
    rate_row = np.array([means[n][1] for n in names])
    recovery_by, recovery_of, notes = recoveries(judges_presence, clean, corrupted)
    recovery = recovery_of[recovery_by](rate_row if recovery_by == "rate" else clip_row)
    timings.update(samples=len(samples.rows) + len(seeds), processes=group.world_size,
                   total_s=time.perf_counter() - started)
    result = UNetTraceResult(
        prompt=prompt, subject=subject, model_hash=model_hash, granularity=granularity,
        components=tuple(names), clean=clean, corrupted=corrupted, clip=clip_row.tolist(),
        rate=rate_row.tolist() if judges_presence else None, recovery=recovery, recovery_by=recovery_by,
        clip_recovery=recovery_of["clip"](clip_row),
        settings=settings, timings={k: (round(v, 3) if isinstance(v, float) else v) for k, v in timings.items()},
        notes=tuple(notes),
    )
    if use_cache and group.is_main:
        cache.save_entry(entry, "trace.json", result.to_dict(), {})
    return result


def _unet_result_from_dict(payload: dict) -> UNetTraceResult:
    return UNetTraceResult(**shared_result_fields(payload), granularity=payload["granularity"])


def unet_heatmap_panels(result: UNetTraceResult):
    from compiler.locate.heatmap import HeatmapPanel

    rows = [(f"{result.recovery_by} recovery", result.recovery)]
    if result.recovery_by != "clip":
        rows.append(("clip recovery", result.clip_recovery))
    values = np.array([row for _, row in rows], dtype=np.float64)
    highlight = (0, int(np.nanargmax(values[0]))) if np.isfinite(values[0]).any() else None
    title = (f"UNet {result.granularity} output restored: recovery of '{result.subject}' (clean "
             f"{measure_label(result.clean, result.recovery_by)}, corrupted "
             f"{measure_label(result.corrupted, result.recovery_by)} by {result.recovery_by})")
    return [HeatmapPanel(title, values, [label for label, _ in rows], list(result.components), "",
                         "restored component", vmin=0.0, vmax=1.0, highlight=highlight)]
