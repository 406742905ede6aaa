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
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compiler.errors import UserError
from compiler.locate import cache
from compiler.locate.distributed import current_process_group
from compiler.locate.engine import (
    GenerationSettings,
    PromptEmbeddings,
    embed_prompts,
    embed_unconditional,
    generate_from_embeddings,
)
from compiler.locate.scoring import can_judge_presence, clip_scores, presence
from compiler.resolve import default_preserve_prompts, last_token_index

TEXT_COMPONENTS = ("layer", "attn", "mlp")
UNET_GRANULARITIES = ("blocks", "attentions")
SCHEMA_VERSION = 2  # part of the cache key: a new schema never reads old entries


# ----------------------------------------------------------------------------- the text encoder
@dataclass(frozen=True)
class PromptTokens:
    ids: list[int]  # BOS … EOS, no padding
    labels: list[str]  # readable tokens: "<bos>", "a", "house", …, "<eos>"
    subject_first: int  # position of the subject's first and last token (BOS = 0)
    subject_last: int


def prompt_tokens(tokenizer, prompt: str, subject: str) -> PromptTokens:
    if subject.lower() not in prompt.lower():
        raise UserError(f"--subject {subject!r} does not occur in --prompt {prompt!r}")
    ids = tokenizer(prompt).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise UserError(f"the prompt has {len(ids)} tokens; the model reads {tokenizer.model_max_length}")
    last = last_token_index(tokenizer, prompt, subject)
    # CLIP's BPE splits at whitespace first, so the subject's tokens in the prompt are its own.
    count = len(tokenizer(subject, add_special_tokens=False).input_ids)
    labels = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        if i == 0:
            labels.append("<bos>")
        elif i == len(ids) - 1:
            labels.append("<eos>")
        else:
            labels.append(token.removesuffix("</w>"))
    return PromptTokens(ids, labels, last - count + 1, last)


def _encoder_layers(text_encoder) -> torch.nn.ModuleList:
    """The transformer layers of a CLIP text encoder, whatever the transformers version."""
    for name, module in text_encoder.named_modules():
        if name.endswith("encoder.layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise UserError(f"{type(text_encoder).__name__}: no encoder.layers; causal tracing of the text "
                    f"encoder supports CLIP text encoders")


def _component(layer: torch.nn.Module, component: str) -> torch.nn.Module:
    return {"layer": layer, "attn": layer.self_attn, "mlp": layer.mlp}[component]


def token_embedding_std(pipe, prompts: list[str] | None = None) -> float:
    """The empirical std of token embeddings: over every entry of the input embeddings of the
    distinct tokens in ``prompts`` (default: 60 generic captions), i.e. of tokens that real
    text uses, not of the whole vocabulary (much of which a small model never trained)."""
    prompts = prompts or default_preserve_prompts([])
    ids = sorted({i for p in prompts for i in pipe.tokenizer(p).input_ids})
    table = pipe.text_encoder.get_input_embeddings().weight
    return float(table[torch.tensor(ids, device=table.device)].detach().float().std())


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
class TraceMeasure:
    clip: float
    rate: float | None


@dataclass(frozen=True)
class TextTraceResult:
    prompt: str
    subject: str
    model_hash: str
    tokens: tuple[str, ...]  # labels, BOS … EOS
    subject_positions: tuple[int, int]  # first, last (BOS = 0)
    components: tuple[str, ...]
    num_layers: int
    clean: TraceMeasure
    corrupted: TraceMeasure
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

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload.update(schema_version=SCHEMA_VERSION, kind="trace-text-encoder")
        return _json_safe(payload)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _json_safe(value):
    """NaN -> None, tuples -> lists: strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _from_json(value):
    """None -> NaN inside grids (the inverse of ``_json_safe`` for numbers)."""
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [math.nan if v is None else _from_json(v) for v in value]
    return value


def _noise(count: int, shape: tuple[int, int], std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((count, *shape), generator=generator) * std


def _judge_samples(judge, images, prompt, subject, judges_presence):
    clip = clip_scores(judge, images, [prompt] * len(images))
    rate = presence(judge, images, subject) if judges_presence else None
    return clip, rate


def _sweep(pipe, group, embeddings, unconditional, rows, seeds, generation, judge, prompt, subject,
           judges_presence, prepare, progress, desc):
    """Generate and judge this rank's share of the samples; every rank gets all the scores."""
    local = group.shard(len(rows))
    local_rows = [rows[k] for k in local]
    local_seeds = [seeds[k] for k in local]
    scores = {}

    def prepare_local(start, stop):
        if prepare is not None:
            prepare([local[i] for i in range(start, stop)])

    for start, stop, images in generate_from_embeddings(pipe, embeddings, unconditional, local_rows,
                                                        local_seeds, generation, prepare=prepare_local,
                                                        progress=progress, desc=desc):
        clip, rate = _judge_samples(judge, images, prompt, subject, judges_presence)
        for i in range(stop - start):
            scores[local[start + i]] = (float(clip[i]), float(rate[i]) if rate is not None else math.nan)
    merged = {}
    for part in group.gather(scores):
        merged.update(part)
    clip = np.array([merged[k][0] for k in range(len(rows))])
    rate = np.array([merged[k][1] for k in range(len(rows))])
    return clip, rate


def _means_by_label(labels: list, clip: np.ndarray, rate: np.ndarray) -> dict:
    """label -> (mean CLIP-score, mean rate) over the samples with that label."""
    groups: dict = {}
    for k, label in enumerate(labels):
        groups.setdefault(label, []).append(k)
    return {label: (float(clip[ks].mean()), float(rate[ks].mean())) for label, ks in groups.items()}


class _SampleList:
    """Parallel lists: embedding-table row, seed, and what each sample measures."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.seeds: list[int] = []
        self.labels: list = []

    def add(self, row: int, seed: int, label) -> None:
        self.rows.append(row)
        self.seeds.append(int(seed))
        self.labels.append(label)


# Below these contrasts (a rate difference of one image in a hundred, a raw cosine of 1e-3)
# clean and corrupted do not differ, and recovery is undefined.
_MIN_RATE_CONTRAST = 1e-2
_MIN_CLIP_CONTRAST = 1e-3


def _recovery(values: np.ndarray, clean: float, corrupted: float, minimum: float) -> list:
    """(restored − corrupted) / (clean − corrupted), as lists; NaN when the corruption changed
    the measure by less than ``minimum``."""
    if abs(clean - corrupted) < minimum:
        return np.full_like(values, np.nan).tolist()
    return ((values - corrupted) / (clean - corrupted)).tolist()


def _recoveries(judges_presence: bool, clean: TraceMeasure, corrupted: TraceMeasure):
    """(deciding measure, {measure: grid -> recovery grid}, notes).

    The judge's rate decides when the judge can tell the subject, else the CLIP-score; the
    CLIP-score's recovery is reported either way (it sees partial recoveries a rate misses).
    """
    by = "rate" if judges_presence else "clip"
    functions = {"clip": lambda values: _recovery(values, clean.clip, corrupted.clip, _MIN_CLIP_CONTRAST)}
    if judges_presence:
        functions["rate"] = lambda values: _recovery(values, clean.rate, corrupted.rate, _MIN_RATE_CONTRAST)
    high, low = (clean.rate, corrupted.rate) if by == "rate" else (clean.clip, corrupted.clip)
    notes = []
    if abs(high - low) < (_MIN_RATE_CONTRAST if by == "rate" else _MIN_CLIP_CONTRAST):
        notes.append(f"the corruption does not change the {by} (clean {high:.3f}, corrupted {low:.3f}): "
                     f"nothing to recover; raise the noise scale or check that the model shows the subject")
    return by, functions, notes


def _trace_settings(pipe, prompt, subject, seeds, steps, guidance, height, width, noise_scale,
                    noise_samples, noise_seed):
    std = token_embedding_std(pipe)
    return {"prompt": prompt, "subject": subject, "seeds": [int(s) for s in seeds], "steps": steps,
            "guidance": guidance, "height": height, "width": width, "noise_scale": noise_scale,
            "noise_std": std, "noise_samples": noise_samples, "noise_seed": noise_seed}


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
    if hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None:
        raise UserError("text-encoder tracing covers single-encoder models (SD-1.x, SD-2.x); SD-XL "
                        "has two encoders")
    tokens = prompt_tokens(pipe.tokenizer, prompt, subject)
    settings = _trace_settings(pipe, prompt, subject, seeds, steps, guidance, height, width, noise_scale,
                               noise_samples, noise_seed)
    settings["components"] = list(components)
    group = current_process_group()
    model_hash = model_hash or cache.weights_fingerprint(pipe)
    entry = cache.entry_dir("trace", model_hash, cache.slug(subject),
                            cache.settings_key({"model_hash": model_hash, "kind": "text",
                                                "schema": SCHEMA_VERSION, **settings}))
    if use_cache:
        hit = group.broadcast(cache.load_entry(entry, "trace.json") if group.is_main else None)
        if hit is not None:
            return _text_result_from_dict(hit[0])

    judges_presence = can_judge_presence(judge, subject)
    timings = {}
    t0 = time.perf_counter()
    tracer = TextEncoderTracer(pipe.text_encoder, tokens)
    num_layers = len(tracer.layers)
    n_subject = tokens.subject_last - tokens.subject_first + 1
    width_d = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    noise = _noise(noise_samples, (n_subject, width_d), noise_scale * settings["noise_std"], noise_seed)
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
    samples = _SampleList()
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
    clip, rate = _sweep(pipe, group, embeddings, embed_unconditional(pipe), samples.rows, samples.seeds,
                        GenerationSettings(steps, guidance, height, width, batch), judge, prompt, subject,
                        judges_presence, None, progress, f"trace text {subject}")
    timings["sweep_s"] = time.perf_counter() - t0

    means = _means_by_label(samples.labels, clip, rate)
    clean = TraceMeasure(means["clean"][0], means["clean"][1] if judges_presence else None)
    corrupted = TraceMeasure(means["corrupted"][0], means["corrupted"][1] if judges_presence else None)
    clip_grid = {c: np.full((num_layers, len(tokens.ids)), np.nan) for c in components}
    rate_grid = {c: np.full((num_layers, len(tokens.ids)), np.nan) for c in components}
    for c, layer, t in cells:
        clip_grid[c][layer, t], rate_grid[c][layer, t] = means[(c, layer, t)]
    recovery_by, recovery_of, notes = _recoveries(judges_presence, clean, corrupted)
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
    return TextTraceResult(
        prompt=payload["prompt"], subject=payload["subject"], model_hash=payload["model_hash"],
        tokens=tuple(payload["tokens"]), subject_positions=tuple(payload["subject_positions"]),
        components=tuple(payload["components"]), num_layers=payload["num_layers"],
        clean=TraceMeasure(**payload["clean"]), corrupted=TraceMeasure(**payload["corrupted"]),
        clip=_from_json(payload["clip"]), rate=_from_json(payload["rate"]) if payload["rate"] else None,
        recovery=_from_json(payload["recovery"]), recovery_by=payload["recovery_by"],
        clip_recovery=_from_json(payload["clip_recovery"]),
        settings=payload["settings"], timings=payload["timings"], notes=tuple(payload["notes"]), cached=True,
    )


# ----------------------------------------------------------------------------- the UNet
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
class UNetTraceResult:
    prompt: str
    subject: str
    model_hash: str
    granularity: str
    components: tuple[str, ...]  # in the order the UNet runs them
    clean: TraceMeasure
    corrupted: TraceMeasure
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

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload.update(schema_version=SCHEMA_VERSION, kind="trace-unet")
        return _json_safe(payload)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


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
    if hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None:
        raise UserError("UNet tracing corrupts one CLIP text encoder's input; SD-XL has two")
    tokens = prompt_tokens(pipe.tokenizer, prompt, subject)
    components = unet_components(pipe.unet, granularity)
    settings = _trace_settings(pipe, prompt, subject, seeds, steps, guidance, height, width, noise_scale,
                               noise_samples, noise_seed)
    settings["granularity"] = granularity
    group = current_process_group()
    model_hash = model_hash or cache.weights_fingerprint(pipe)
    entry = cache.entry_dir("trace", model_hash, cache.slug(subject),
                            cache.settings_key({"model_hash": model_hash, "kind": "unet",
                                                "schema": SCHEMA_VERSION, **settings}))
    if use_cache:
        hit = group.broadcast(cache.load_entry(entry, "trace.json") if group.is_main else None)
        if hit is not None:
            return _unet_result_from_dict(hit[0])

    judges_presence = can_judge_presence(judge, subject)
    timings = {}
    t0 = time.perf_counter()
    tracer = TextEncoderTracer(pipe.text_encoder, tokens)
    n_subject = tokens.subject_last - tokens.subject_first + 1
    width_d = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    noise = _noise(noise_samples, (n_subject, width_d), noise_scale * settings["noise_std"], noise_seed)
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
        clip, rate = _judge_samples(judge, clean_images, prompt, subject, judges_presence)
        clean = TraceMeasure(float(clip.mean()), float(rate.mean()) if judges_presence else None)
        timings["clean_s"] = time.perf_counter() - t0

        samples = _SampleList()
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
        clip, rate = _sweep(pipe, group, embeddings, unconditional, samples.rows, samples.seeds, generation,
                            judge, prompt, subject, judges_presence, prepare, progress, f"trace unet {subject}")
        timings["sweep_s"] = time.perf_counter() - t0

    means = _means_by_label([name for name, _ in samples.labels], clip, rate)
    corrupted = TraceMeasure(means["corrupted"][0], means["corrupted"][1] if judges_presence else None)
    names = [name for name, _ in components]
    clip_row = np.array([means[n][0] for n in names])
    rate_row = np.array([means[n][1] for n in names])
    recovery_by, recovery_of, notes = _recoveries(judges_presence, clean, corrupted)
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
    return UNetTraceResult(
        prompt=payload["prompt"], subject=payload["subject"], model_hash=payload["model_hash"],
        granularity=payload["granularity"], components=tuple(payload["components"]),
        clean=TraceMeasure(**payload["clean"]), corrupted=TraceMeasure(**payload["corrupted"]),
        clip=_from_json(payload["clip"]), rate=_from_json(payload["rate"]) if payload["rate"] else None,
        recovery=_from_json(payload["recovery"]), recovery_by=payload["recovery_by"],
        clip_recovery=_from_json(payload["clip_recovery"]),
        settings=payload["settings"], timings=payload["timings"], notes=tuple(payload["notes"]), cached=True,
    )


# ----------------------------------------------------------------------------- outputs
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
                     f"'{result.subject}' by {by} (clean {_measure(result.clean, by)}, "
                     f"corrupted {_measure(result.corrupted, by)})")
            panels.append(HeatmapPanel(title, values, [str(i) for i in range(result.num_layers)], tokens,
                                       "layer", "token (* = subject)", vmin=0.0, vmax=1.0,
                                       highlight=tuple(int(i) for i in highlight) if highlight else None))
    return panels


def unet_heatmap_panels(result: UNetTraceResult):
    from compiler.locate.heatmap import HeatmapPanel

    rows = [(f"{result.recovery_by} recovery", result.recovery)]
    if result.recovery_by != "clip":
        rows.append(("clip recovery", result.clip_recovery))
    values = np.array([row for _, row in rows], dtype=np.float64)
    highlight = (0, int(np.nanargmax(values[0]))) if np.isfinite(values[0]).any() else None
    title = (f"UNet {result.granularity} output restored: recovery of '{result.subject}' (clean "
             f"{_measure(result.clean, result.recovery_by)}, corrupted "
             f"{_measure(result.corrupted, result.recovery_by)} by {result.recovery_by})")
    return [HeatmapPanel(title, values, [label for label, _ in rows], list(result.components), "",
                         "restored component", vmin=0.0, vmax=1.0, highlight=highlight)]


def _measure(measure: TraceMeasure, by: str) -> str:
    value = measure.rate if by == "rate" else measure.clip
    return "n/a" if value is None else f"{value:.2f}"


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
