"""What both tracers share: the prompt's tokens, the corruption, the batched sweep that
generates and judges every sample, recovery, the cache entry and JSON round trips."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compiler.errors import UserError
from compiler.locate import cache
from compiler.locate.engine import generate_from_embeddings
from compiler.locate.measure import MIN_CLIP_CONTRAST, MIN_RATE_CONTRAST, Measurement
from compiler.locate.scoring import clip_scores, presence
from compiler.resolve import default_preserve_prompts, last_token_index, vocabulary_of

SCHEMA_VERSION = 2  # part of the cache key: a new schema never reads old entries


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


def token_embedding_std(pipe, prompts: list[str] | None = None) -> float:
    """The empirical std of token embeddings: over every entry of the input embeddings of the
    distinct tokens in ``prompts`` (default: 60 generic captions), i.e. of tokens that real
    text uses, not of the whole vocabulary (much of which a small model never trained)."""
    prompts = prompts or default_preserve_prompts([], vocabulary_of(pipe), 60)
    ids = sorted({i for p in prompts for i in pipe.tokenizer(p).input_ids})
    table = pipe.text_encoder.get_input_embeddings().weight
    return float(table[torch.tensor(ids, device=table.device)].detach().float().std())


class TraceResultJSON:
    """``to_dict``/``to_json`` of a trace result: a dataclass naming its ``KIND``."""

    KIND = ""

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload.update(schema_version=SCHEMA_VERSION, kind=self.KIND)
        return json_safe(payload)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def shared_result_fields(payload: dict) -> dict:
    """The fields both trace results read back from their JSON (a cache hit)."""
    return dict(
        prompt=payload["prompt"], subject=payload["subject"], model_hash=payload["model_hash"],
        components=tuple(payload["components"]),
        clean=Measurement(**payload["clean"]), corrupted=Measurement(**payload["corrupted"]),
        clip=from_json(payload["clip"]), rate=from_json(payload["rate"]) if payload["rate"] else None,
        recovery=from_json(payload["recovery"]), recovery_by=payload["recovery_by"],
        clip_recovery=from_json(payload["clip_recovery"]),
        settings=payload["settings"], timings=payload["timings"], notes=tuple(payload["notes"]), cached=True,
    )


def json_safe(value):
    """NaN -> None, tuples -> lists: strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def from_json(value):
    """None -> NaN inside grids (the inverse of ``json_safe`` for numbers)."""
    if isinstance(value, dict):
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [math.nan if v is None else from_json(v) for v in value]
    return value


def corruption_noise(pipe, tokens: PromptTokens, settings: dict) -> torch.Tensor:
    """``noise_samples`` draws of Gaussian noise (K, n_subject, d) with std ``noise_scale`` ×
    the empirical std of token embeddings, for the subject's token embeddings."""
    n_subject = tokens.subject_last - tokens.subject_first + 1
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    generator = torch.Generator("cpu").manual_seed(settings["noise_seed"])
    std = settings["noise_scale"] * settings["noise_std"]
    return torch.randn((settings["noise_samples"], n_subject, width), generator=generator) * std


def cache_entry(kind: str, model_hash: str, settings: dict) -> Path:
    """The cache folder of a ``kind`` ("text" or "unet") trace with ``settings``."""
    key = cache.settings_key({"model_hash": model_hash, "kind": kind, "schema": SCHEMA_VERSION, **settings})
    return cache.entry_dir("trace", model_hash, cache.slug(settings["subject"]), key)


def cached_payload(entry: Path, group) -> dict | None:
    """The cached result in ``entry``, read by rank 0 and sent to every rank; None on a miss."""
    hit = group.broadcast(cache.load_entry(entry, "trace.json") if group.is_main else None)
    return None if hit is None else hit[0]


def judge_samples(judge, images, prompt, subject, judges_presence):
    clip = clip_scores(judge, images, [prompt] * len(images))
    rate = presence(judge, images, subject) if judges_presence else None
    return clip, rate


def sweep(pipe, group, embeddings, unconditional, rows, seeds, generation, judge, prompt, subject,
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
        clip, rate = judge_samples(judge, images, prompt, subject, judges_presence)
        for i in range(stop - start):
            scores[local[start + i]] = (float(clip[i]), float(rate[i]) if rate is not None else math.nan)
    merged = {}
    for part in group.gather(scores):
        merged.update(part)
    clip = np.array([merged[k][0] for k in range(len(rows))])
    rate = np.array([merged[k][1] for k in range(len(rows))])
    return clip, rate


def means_by_label(labels: list, clip: np.ndarray, rate: np.ndarray) -> dict:
    """label -> (mean CLIP-score, mean rate) over the samples with that label."""
    groups: dict = {}
    for k, label in enumerate(labels):
        groups.setdefault(label, []).append(k)
    return {label: (float(clip[ks].mean()), float(rate[ks].mean())) for label, ks in groups.items()}


class SampleList:
    """Parallel lists: embedding-table row, seed, and what each sample measures."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.seeds: list[int] = []
        self.labels: list = []

    def add(self, row: int, seed: int, label) -> None:
        self.rows.append(row)
        self.seeds.append(int(seed))
        self.labels.append(label)


def _recovery(values: np.ndarray, clean: float, corrupted: float, minimum: float) -> list:
    """(restored − corrupted) / (clean − corrupted), as lists; NaN when the corruption changed
    the measure by less than ``minimum``."""
    if abs(clean - corrupted) < minimum:
        return np.full_like(values, np.nan).tolist()
    return ((values - corrupted) / (clean - corrupted)).tolist()


def recoveries(judges_presence: bool, clean: Measurement, corrupted: Measurement):
    """(deciding measure, {measure: grid -> recovery grid}, notes).

    The judge's rate decides when the judge can tell the subject, else the CLIP-score; the
    CLIP-score's recovery is reported either way (it sees partial recoveries a rate misses).
    """
    by = "rate" if judges_presence else "clip"
    functions = {"clip": lambda values: _recovery(values, clean.clip, corrupted.clip, MIN_CLIP_CONTRAST)}
    if judges_presence:
        functions["rate"] = lambda values: _recovery(values, clean.rate, corrupted.rate, MIN_RATE_CONTRAST)
    high, low = (clean.rate, corrupted.rate) if by == "rate" else (clean.clip, corrupted.clip)
    notes = []
    if abs(high - low) < (MIN_RATE_CONTRAST if by == "rate" else MIN_CLIP_CONTRAST):
        notes.append(f"the corruption does not change the {by} (clean {high:.3f}, corrupted {low:.3f}): "
                     f"nothing to recover; raise the noise scale or check that the model shows the subject")
    return by, functions, notes


def trace_settings(pipe, prompt, subject, seeds, steps, guidance, height, width, noise_scale,
                    noise_samples, noise_seed):
    from compiler.device import compute_tag

    std = token_embedding_std(pipe)
    return {"prompt": prompt, "subject": subject, "seeds": [int(s) for s in seeds], "steps": steps,
            "guidance": guidance, "height": height, "width": width, "noise_scale": noise_scale,
            "noise_std": std, "noise_samples": noise_samples, "noise_seed": noise_seed,
            # where the images are drawn (the cache key): a GPU's half precision is not the CPU's
            "compute": compute_tag(pipe.unet.device, pipe.unet.dtype)}


def measure_label(measure: Measurement, by: str) -> str:
    value = measure.rate if by == "rate" else measure.clip
    return "n/a" if value is None else f"{value:.2f}"
