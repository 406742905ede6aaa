"""LocoGen (Basu et al., ICML 2024): find the window of cross-attention layers that holds a concept.

For a window of m adjacent cross-attention layers ``j … j+m−1``, those layers see the context
c′ of the prompt *without* the attribute ("a house in the style of a painting") while every
other layer sees c ("a house in the style of van gogh"). If the generated images lose the
attribute, the window holds it. A sweep tries every start j for m = 1 … max_m; the smallest m
whose best window passes the threshold wins.

How a window is scored:

- the papers' measure: the mean CLIP-score of the images against the original prompt (style,
  object: lower is better) or against the target prompt (fact: higher is better);
- the judge's zero-shot *rate* of the judged phrase, when the judge can classify images (the toy
  world's judge): the fraction of images showing the concept (style, object: lower is better)
  or the fact's new answer (higher is better).

Raw CLIP-scores differ between models and prompts, so a window passes when its *effect* reaches
``threshold``: effect = (window − clean) / (replaced − clean), where "clean" is c in every layer
and "replaced" is c′ in every layer (the most any window could do). Effect 0 is no change, 1 is
as much as replacing the prompt everywhere. ``criterion`` says which measure decides: the
judge's rate when it is available ("auto"), else the CLIP-score.

Speed: prompts are encoded once; clean and replaced references are two more "windows" of the
same sweep (so the clean images are generated once and serve every window); every sample of a
batch carries its own window (``routing``), so the whole sweep is (#windows + 2) × prompts ×
seeds samples in ``batch``-sized pipeline calls; results are cached on disk (``cache``); with
several processes (``torchrun``) the samples are sharded over them (``distributed``).

This module holds the settings, the result types and the sweep itself (``locate``,
``locate_cached``); window scores and the choice of the winner are ``scoring``'s, the routed
generation and the merge of the ranks' samples ``routing``'s, the pictures ``heatmap``'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from compiler.device import compute_tag
from compiler.errors import UserError
from compiler.locate import cache
from compiler.locate.distributed import current_process_group
from compiler.locate.engine import GenerationSettings, embed_prompts, embed_unconditional
from compiler.locate.measure import Measurement
from compiler.locate.routing import (
    cross_attention_modules,
    merge_ranks,
    run_routed,
    window_masks,
)
from compiler.locate.scoring import (
    WindowScore,
    can_judge_presence,
    choose_window,
    contrast_notes,
    judged_measure,
    mean_measurement,
    score_window,
)
from compiler.models.families import LayerWindow
from compiler.prompts import vocabulary_for
from compiler.resolve import prompt_pairs, vocabulary_of

ATTRIBUTES = ("style", "object", "fact")
CRITERIA = ("auto", "accuracy", "clip")
SCHEMA_VERSION = 1
# Part of the cache key: bump when the same sweep would now give another answer.
LOCATE_VERSION = 2


# ----------------------------------------------------------------------------- prompts
def sweep_prompts(concept: str, replacement: str, attribute: str, prompts: list[str] | None = None,
                  n_prompts: int = 8, vocabulary=None) -> tuple[list[str], list[str]]:
    """(prompts with the concept, the same prompts with the replacement).

    Without ``prompts``, ``n_prompts`` of the papers' templates for the attribute, spread
    evenly over the template list (so they vary subject, prefix and style). The templates are
    ``vocabulary``'s (give the model's, ``resolve.vocabulary_of``; default: the real-world one).
    """
    if vocabulary is None:
        vocabulary = vocabulary_for(None)
    if prompts:
        missing = [p for p in prompts if concept.lower() not in p.lower()]
        if missing:
            raise UserError(f"prompt {missing[0]!r} does not contain the concept {concept!r}; every "
                            f"LocoGen prompt must mention it")
        # Only the user's prompts: no templates (prefixes=()).
        pairs = prompt_pairs(concept, replacement, attribute, extra_prompts=prompts, vocabulary=vocabulary,
                             templates=False)
    else:
        pairs = prompt_pairs(concept, replacement, attribute, vocabulary=vocabulary)
        if n_prompts < 1:
            raise UserError(f"--prompts must be at least 1, got {n_prompts}")
        stride = max(1, len(pairs) // n_prompts)
        pairs = pairs[::stride][:n_prompts]
    return [p.source for p in pairs], [p.target for p in pairs]


def sweep_windows(num_layers: int, max_m: int) -> list[LayerWindow]:
    """Every window of m = 1 … max_m adjacent layers, by m then start."""
    return [LayerWindow(j, m) for m in range(1, max_m + 1) for j in range(num_layers - m + 1)]


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Confirmation:
    """The winner measured again at full settings (``confirm_steps``, the model's resolution)."""

    steps: int
    clean: Measurement
    replaced: Measurement
    best: WindowScore


@dataclass(frozen=True)
class LocateSettings:
    """How a LocoGen sweep runs. ``locate`` takes one and returns, in its result, the settings
    that ran: ``prompts`` and ``alternative_prompts`` filled in, ``criterion`` resolved."""

    prompts: tuple[str, ...] = ()  # with the concept: c (empty: n_prompts of the attribute's templates)
    alternative_prompts: tuple[str, ...] = ()  # with the replacement: c′ (locate fills them in)
    seeds: tuple[int, ...] = (0,)
    steps: int = 25
    guidance: float = 4.0
    height: int | None = None  # sweep resolution (None: the model's)
    width: int | None = None
    max_m: int = 3
    threshold: float = 0.8
    criterion: str = "auto"  # "auto", "accuracy" or "clip"; the result's holds the resolved one
    full_sweep: bool = False  # False: stop at the first m whose best window passes
    confirm_steps: int | None = None  # None: no confirmation run
    n_prompts: int = 8  # template prompts when ``prompts`` is empty
    batch: int = 32  # samples per pipeline call

    def key_fields(self) -> dict:
        """What decides the result (the cache key and the result's JSON): not how it is batched,
        nor how many templates were asked for (the prompts say it)."""
        fields = asdict(self)
        del fields["n_prompts"], fields["batch"]
        return fields


@dataclass(frozen=True)
class LocateResult:
    concept: str
    replacement: str
    attribute: str
    model_hash: str
    layer_names: tuple[str, ...]  # cross-attention layers in the papers' order
    best_start: int
    best_size: int
    passed: bool  # False: no window of size ≤ max_m reached the threshold; best is the strongest
    judged_phrase: str  # what the rate counts: the concept, or the fact's new answer
    scored_against: str  # "original" (style, object) or "target" (fact) prompts
    clean: Measurement
    replaced: Measurement
    windows: tuple[WindowScore, ...]
    settings: LocateSettings
    timings: dict
    confirmation: Confirmation | None = None
    notes: tuple[str, ...] = ()
    cached: bool = False
    # clean / best window / replaced images, uint8 (N, H, W, 3): for the grid, not the JSON.
    images: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def best(self) -> LayerWindow:
        return LayerWindow(self.best_start, self.best_size)

    @property
    def layers(self) -> tuple[int, ...]:
        """The located cross-attention layers (papers' indices): what an edit should touch."""
        return tuple(self.best.layers)

    @property
    def best_layer_names(self) -> list[str]:
        return [self.layer_names[i] for i in self.best.layers]

    def window_score(self, start: int, size: int) -> WindowScore:
        return next(w for w in self.windows if w.start == start and w.size == size)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "locogen",
            "concept": self.concept,
            "replacement": self.replacement,
            "attribute": self.attribute,
            "model_hash": self.model_hash,
            "num_layers": len(self.layer_names),
            "layer_names": list(self.layer_names),
            "best": {"start": self.best_start, "size": self.best_size, "layers": self.best.layers,
                     "layer_names": self.best_layer_names, "passed": self.passed},
            "criterion": self.settings.criterion,
            "threshold": self.settings.threshold,
            "judged_phrase": self.judged_phrase,
            "scored_against": self.scored_against,
            "clean": asdict(self.clean),
            "replaced": asdict(self.replaced),
            "windows": [asdict(w) for w in self.windows],
            "settings": self.settings.key_fields(),
            "confirmation": asdict(self.confirmation) if self.confirmation else None,
            "timings": dict(self.timings),
            "notes": list(self.notes),
            "cached": self.cached,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, payload: dict, images: dict | None = None, cached: bool = False) -> LocateResult:
        settings = dict(payload["settings"])
        for name in ("prompts", "alternative_prompts", "seeds"):
            settings[name] = tuple(settings[name])
        return cls(
            concept=payload["concept"], replacement=payload["replacement"],
            attribute=payload["attribute"], model_hash=payload["model_hash"],
            layer_names=tuple(payload["layer_names"]),
            best_start=payload["best"]["start"], best_size=payload["best"]["size"],
            passed=payload["best"]["passed"], judged_phrase=payload["judged_phrase"],
            scored_against=payload["scored_against"],
            clean=Measurement(**payload["clean"]), replaced=Measurement(**payload["replaced"]),
            windows=tuple(WindowScore(**w) for w in payload["windows"]),
            settings=LocateSettings(**settings), timings=dict(payload["timings"]),
            confirmation=_confirmation_from_dict(payload.get("confirmation")),
            notes=tuple(payload.get("notes", ())), cached=cached, images=dict(images or {}),
        )

    def summary(self) -> str:
        """One line for people: where the concept lives."""
        w = self.window_score(self.best_start, self.best_size)
        layers = f"layers {self.best_start}-{self.best_start + self.best_size - 1}"
        verdict = "located" if self.passed else f"not located within m <= {self.settings.max_m}; strongest"
        rate = "" if w.rate is None else (f", {self.judged_phrase!r} rate {w.rate:.2f} "
                                          f"(clean {self.clean.rate:.2f}, c' everywhere {self.replaced.rate:.2f})")
        line = (f"{self.concept!r} ({self.attribute}) {verdict}: window j={self.best_start} "
                f"m={self.best_size} ({layers}); CLIP-score {w.clip:.3f} vs clean "
                f"{self.clean.clip:.3f}{rate}")
        if self.confirmation is not None:
            c = self.confirmation
            measure = "rate" if self.settings.criterion == "accuracy" else "CLIP-score"
            value = c.best.rate if self.settings.criterion == "accuracy" else c.best.clip
            line += (f"; at {c.steps} steps: {measure} {value:.2f}, "
                     f"{'confirmed' if c.best.passed else 'NOT confirmed'}")
        return line


def _confirmation_from_dict(payload: dict | None) -> Confirmation | None:
    if payload is None:
        return None
    return Confirmation(payload["steps"], Measurement(**payload["clean"]), Measurement(**payload["replaced"]),
                        WindowScore(**payload["best"]))


# ----------------------------------------------------------------------------- the sweep
def locate(
    pipe,
    concept: str,
    replacement: str,
    attribute: str,
    settings: LocateSettings = LocateSettings(),
    *,
    judge,
    model_hash: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
    vocabulary=None,
) -> LocateResult:
    """Run LocoGen for one concept and return where it lives.

    Prompts come from ``vocabulary`` (default: the one ``pipe``'s folder gets).

    ``judge`` scores images (``clip_scores``; ``classify`` too for the accuracy criterion).
    ``settings.full_sweep``: sweep every m up to ``max_m`` even after one passes (a complete
    heat map); by default the sweep stops at the first passing m.
    ``settings.confirm_steps``: sweep cheaply (few ``steps``, a lower ``height``/``width``), then
    measure clean, c′ everywhere and the winner again with ``confirm_steps`` at the model's
    resolution. ``model_hash`` keys the cache (``LoadedModel.model_hash``); without it the
    weights are hashed in memory. With ``torch.distributed`` initialized, the samples are
    sharded over the ranks and every rank returns the same result; only rank 0 writes the cache.
    """
    started = time.perf_counter()
    criterion = settings.criterion
    if attribute not in ATTRIBUTES:
        raise UserError(f"attribute {attribute!r} is not one of {', '.join(ATTRIBUTES)}")
    if criterion not in CRITERIA:
        raise UserError(f"criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    if not concept.strip() or not replacement.strip():
        raise UserError("concept and replacement must be non-empty phrases")
    if settings.steps < 1 or settings.batch < 1 or not settings.seeds:
        raise UserError("steps and batch must be at least 1, and at least one seed is needed")
    layers = cross_attention_modules(pipe.unet)
    num_layers = len(layers)
    if num_layers == 0:
        raise UserError("the model's UNet has no cross-attention layers to locate in")
    if not 1 <= settings.max_m <= num_layers:
        raise UserError(f"--max-m must be between 1 and {num_layers} (the model's cross-attention "
                        f"layers), got {settings.max_m}")

    originals, alternatives = sweep_prompts(concept, replacement, attribute, list(settings.prompts) or None,
                                            settings.n_prompts, vocabulary or vocabulary_of(pipe))
    judged_phrase, higher_is_better, scored_against = judged_measure(attribute, concept, replacement)
    if criterion == "auto":
        criterion = "accuracy" if can_judge_presence(judge, judged_phrase) else "clip"
    elif criterion == "accuracy" and not can_judge_presence(judge, judged_phrase):
        raise UserError(f"criterion 'accuracy' needs a judge that can tell whether an image shows "
                        f"{judged_phrase!r} (the toy world's); use --criterion clip")
    if settings.confirm_steps is not None and settings.confirm_steps < 1:
        raise UserError(f"confirm steps must be at least 1, got {settings.confirm_steps}")
    settings = replace(settings, prompts=tuple(originals), alternative_prompts=tuple(alternatives),
                       seeds=tuple(int(s) for s in settings.seeds), criterion=criterion)
    group = current_process_group()
    if model_hash is None:
        model_hash = cache.weights_fingerprint(pipe)
    # Images drawn on a GPU in half precision differ from the CPU's float32 ones: the key names where.
    key = cache.settings_key({"model_hash": model_hash, "concept": concept, "replacement": replacement,
                              "attribute": attribute, "locate_version": LOCATE_VERSION,
                              "compute": compute_tag(pipe.unet.device, pipe.unet.dtype), **settings.key_fields()})
    entry = cache.entry_dir("locate", model_hash, f"{cache.slug(concept)}.{attribute}", key)
    if use_cache:
        hit = group.broadcast(cache.load_entry(entry, "locate.json") if group.is_main else None)
        if hit is not None:
            payload, images = hit
            return LocateResult.from_dict(payload, images, cached=True)

    # Every window of the sweep, plus the two references: clean (no layer gets c′) and
    # replaced (every layer gets c′).
    windows = sweep_windows(num_layers, settings.max_m)
    CLEAN, REPLACED = 0, 1
    masks = window_masks([None, LayerWindow(0, num_layers), *windows], num_layers)

    timings = {}
    t0 = time.perf_counter()
    embeddings = embed_prompts(pipe, originals)
    alternative = embed_prompts(pipe, alternatives)
    unconditional = embed_unconditional(pipe)
    timings["encode_s"] = time.perf_counter() - t0

    score_prompts = originals if scored_against == "original" else alternatives
    generation = GenerationSettings(settings.steps, settings.guidance, settings.height, settings.width,
                                    settings.batch)
    # Samples ordered window-major: (window row of ``masks``, prompt index, seed).
    samples = [(w, p, s) for w in range(masks.shape[0]) for p in range(len(originals)) for s in settings.seeds]

    # Sweep m = 1, 2, …; without ``full_sweep``, stop at the first m whose best window passes
    # (the answer is the same: the smallest passing m wins). The references go with m = 1.
    t0 = time.perf_counter()
    judges_presence = can_judge_presence(judge, judged_phrase)
    clip = np.full(len(samples), np.nan)
    rate = np.full(len(samples), np.nan)
    kept: dict = {}
    scores: list[WindowScore] = []
    clean = replaced = None
    notes: list[str] = []

    def measure(w: int) -> Measurement:
        return mean_measurement(samples, w, clip, rate, judges_presence)

    for m in range(1, settings.max_m + 1):
        stage = {w + 2 for w, window in enumerate(windows) if window.size == m} | ({CLEAN, REPLACED} if m == 1 else set())
        members = [k for k, sample in enumerate(samples) if sample[0] in stage]
        local = [members[i] for i in group.shard(len(members))]
        part = run_routed(pipe, samples, local, masks, embeddings, alternative, unconditional, score_prompts, judge,
                          judged_phrase if judges_presence else None, generation, keep_windows={CLEAN, REPLACED},
                          progress=progress, desc=f"locate {concept} m={m}")
        part_clip, part_rate, part_kept = merge_ranks(group, len(samples), *part)
        done = ~np.isnan(part_clip)
        clip[done], rate[done] = part_clip[done], part_rate[done]
        kept.update(part_kept)
        if m == 1:
            clean, replaced = measure(CLEAN), measure(REPLACED)
            # When c′ everywhere does not move the score the expected way, no window can pass.
            notes = contrast_notes(clean, replaced, criterion, higher_is_better)
        sized = [score_window(window, measure(w + 2), clean, replaced, criterion, settings.threshold,
                              can_pass=not notes)
                 for w, window in enumerate(windows) if window.size == m]
        scores.extend(sized)
        if not settings.full_sweep and choose_window(sized, criterion, higher_is_better)[1]:
            break
    timings["sweep_s"] = time.perf_counter() - t0
    best, passed = choose_window(scores, criterion, higher_is_better)

    def stack(kept_images: dict, sample_list: list, w: int) -> np.ndarray:
        return np.stack([kept_images[k] for k, sample in enumerate(sample_list) if sample[0] == w])

    t0 = time.perf_counter()
    best_mask = window_masks([best.window], num_layers)
    confirmation = None
    if settings.confirm_steps is None:
        # The grid's middle row: the winner's images, generated again (one window: 1/#windows
        # of the sweep) rather than keeping every window's images in memory.
        best_samples = [(0, p, s) for p in range(len(originals)) for s in settings.seeds]
        _, _, best_kept = run_routed(pipe, best_samples, group.shard(len(best_samples)), best_mask, embeddings,
                                     alternative, unconditional, None, None, None, generation,
                                     keep_windows={0}, progress=False, desc="best window")
        _, _, best_kept = merge_ranks(group, len(best_samples), None, None, best_kept)
        images = {"clean": stack(kept, samples, CLEAN), "best": stack(best_kept, best_samples, 0),
                  "replaced": stack(kept, samples, REPLACED)}
    else:
        # Confirm the winner at full settings (the model's resolution, ``confirm_steps``):
        # clean, c′ everywhere and the winner, measured again; their images make the grid.
        final_masks = torch.cat([masks[[CLEAN, REPLACED]], best_mask])
        final_samples = [(w, p, s) for w in range(3) for p in range(len(originals)) for s in settings.seeds]
        full = GenerationSettings(settings.confirm_steps, settings.guidance, None, None, settings.batch)
        f_clip, f_rate, f_kept = run_routed(pipe, final_samples, group.shard(len(final_samples)), final_masks,
                                            embeddings, alternative, unconditional, score_prompts, judge,
                                            judged_phrase if judges_presence else None, full,
                                            keep_windows={0, 1, 2}, progress=False, desc="confirm")
        f_clip, f_rate, f_kept = merge_ranks(group, len(final_samples), f_clip, f_rate, f_kept)

        def final_measure(w: int) -> Measurement:
            return mean_measurement(final_samples, w, f_clip, f_rate, judges_presence)

        f_clean, f_replaced = final_measure(0), final_measure(1)
        confirm_notes = contrast_notes(f_clean, f_replaced, criterion, higher_is_better)
        confirmation = Confirmation(settings.confirm_steps, f_clean, f_replaced,
                                    score_window(best, final_measure(2), f_clean, f_replaced, criterion,
                                                 settings.threshold,
                                                 can_pass=not confirm_notes))
        if passed and not confirmation.best.passed:
            notes.append(f"the winner does not pass at {settings.confirm_steps} steps and full resolution; sweep with "
                         f"settings closer to the confirmation")
        images = {"clean": stack(f_kept, final_samples, 0), "best": stack(f_kept, final_samples, 2),
                  "replaced": stack(f_kept, final_samples, 1)}
    timings["final_s"] = time.perf_counter() - t0

    timings.update(samples=int(np.count_nonzero(~np.isnan(clip))), processes=group.world_size,
                   total_s=time.perf_counter() - started)
    result = LocateResult(
        concept=concept, replacement=replacement, attribute=attribute, model_hash=model_hash,
        layer_names=tuple(layer.name for layer in layers), best_start=best.start, best_size=best.size,
        passed=passed, judged_phrase=judged_phrase, scored_against=scored_against, clean=clean,
        replaced=replaced, windows=tuple(scores), settings=settings, confirmation=confirmation,
        timings={k: (round(v, 3) if isinstance(v, float) else v) for k, v in timings.items()},
        notes=tuple(notes), images=images,
    )
    if use_cache and group.is_main:
        cache.save_entry(entry, "locate.json", result.to_dict(), images)
    return result


# What compile sweeps with when a recipe needs a location nobody has measured: a sweep is
# generation-bound, so few steps, then the winner confirmed at the usual 25.
COMPILE_SWEEP = LocateSettings(n_prompts=6, steps=10, confirm_steps=25, max_m=3)


def locate_cached(loaded, concept: str, replacement: str, attribute: str, *, judge=None,
                  progress: bool = True, settings: LocateSettings = COMPILE_SWEEP) -> LocateResult:
    """LocoGen for ``compile``: the sweep with ``settings`` on this model, concept, replacement
    and attribute, from the cache only when that very sweep (same settings, same device and
    dtype) ran before: what a compile edits never depends on which other sweeps this machine
    happened to run. The result's ``settings`` say which sweep it was.

    ``loaded`` is a ``LoadedModel``; without ``judge`` the model's own judge is used (the toy
    world's), and a model without one needs a ``judge``.
    """
    policy = getattr(loaded, "policy", None)
    if judge is None:
        from compiler.locate.scoring import load_judge_for

        judge = load_judge_for(loaded.source_path, device=policy.device if policy is not None else None)
    if policy is not None:  # batching changes no result (it is not in the cache key)
        settings = replace(settings, batch=policy.generation_batch(settings.batch))
    return locate(loaded.pipeline, concept, replacement, attribute, settings, judge=judge,
                  model_hash=loaded.model_hash, progress=progress)


def write_outputs(result: LocateResult, folder: Path) -> list[Path]:
    """``locate.json``, ``heatmap.png`` and ``grid.png`` into ``folder`` (which must exist)."""
    from compiler.locate.heatmap import save_locogen_pictures

    folder = Path(folder)
    (folder / "locate.json").write_text(result.to_json())
    return [folder / "locate.json", *save_locogen_pictures(result, folder)]
