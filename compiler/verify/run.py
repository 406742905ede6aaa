"""Run verify: plan the probes, generate on both models, score, apply the gates.

``run_verify`` works on pipelines already in memory (``editc compile`` calls it through
``verify_compiled`` right after export); ``verify_paths`` is what ``editc verify`` runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from compiler.errors import UserError
from compiler.recipe import Recipe
from compiler.verify.base_cache import (CACHED, GENERATED, NOT_CACHED, BaseImageCache, judge_identity,
                                        pipeline_settings)
from compiler.verify.gates import evaluate_gates
from compiler.verify.judges import Judge, choose_judge, toy_judge_folder_for
from compiler.verify.metrics import ModelView, generate_plan_images, score_plan
from compiler.verify.probes import DEFAULT_NEIGHBOURS_PER_EDIT, DEFAULT_PROMPTS_PER_GROUP, plan_probes
from compiler.verify.report import VerifyReport, write_reports

TOY_GUIDANCE_SCALE = 4.0  # what the toy model was trained to be sampled with
STABLE_DIFFUSION_GUIDANCE_SCALE = 7.5
DEFAULT_BATCH = 64


@dataclass
class ModelInfo:
    """What a report says about a model: where it came from and its hash."""

    role: str  # "base" | "edited"
    path: str
    family: str = ""
    sha256: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "family": self.family, "sha256": self.sha256}


@dataclass
class LazyBase:
    """The base model of a verify whose images may be cached: its pipeline settings found from
    its configs (``base_cache.settings_from_source``), the pipeline loaded only if the cache
    misses. In a release pipeline the second and later candidates never load the base."""

    settings: dict
    load: Callable[[], object]
    _pipeline: object = field(default=None, repr=False)

    def pipeline(self):
        if self._pipeline is None:
            self._pipeline = self.load()
        return self._pipeline


def default_guidance(judge: Judge) -> float:
    return TOY_GUIDANCE_SCALE if judge.is_toy_world else STABLE_DIFFUSION_GUIDANCE_SCALE


def run_verify(recipe: Recipe, edited_pipe, base_pipe, judge: Judge, *, seeds: int | None = None,
               steps: int | None = None, guidance: float | None = None, clip_scale: float = 1.0,
               prompts_per_group: int = DEFAULT_PROMPTS_PER_GROUP,
               neighbours_per_edit: int | None = DEFAULT_NEIGHBOURS_PER_EDIT, batch: int = DEFAULT_BATCH,
               progress: bool = True, edited_info: ModelInfo | None = None,
               base_info: ModelInfo | None = None, vocabulary=None,
               found_neighbours: dict | None = None, cache: bool = False,
               judge_dir: str | Path | None = None) -> VerifyReport:
    """Verify ``edited_pipe`` against ``base_pipe`` for every edit of ``recipe``.

    ``seeds``, ``steps`` and ``guidance`` default to the recipe's ``verify`` section (guidance:
    4 on the toy world, 7.5 otherwise). ``clip_scale`` multiplies every CLIP-score (100 gives
    the papers' ×100 convention). ``judge`` must use an unedited text tower.

    Prompts come from ``vocabulary`` (default: the base model's, ``resolve.vocabulary_of``);
    ``found_neighbours`` (per edit index, ``(phrase, similarity)`` nearest first) are the
    neighbours compile kept put (default: found again on the base model's text encoder).

    ``cache``: take the base model's images and judgements from the editc cache when an
    earlier verify left them there (``compiler.verify.base_cache``; needs ``base_info.sha256``;
    ``judge_dir`` is the judge's folder, part of the key), else generate and store them.
    """
    from compiler import resolve

    lazy = base_pipe if isinstance(base_pipe, LazyBase) else None
    if lazy is not None and (vocabulary is None or found_neighbours is None):
        base_pipe = lazy.pipeline()  # the base's text encoder is needed after all
    vocabulary = vocabulary or resolve.vocabulary_of(base_pipe, recipe.vocabulary)
    if found_neighbours is None:
        found_neighbours = find_neighbours_on(base_pipe, recipe, vocabulary)
    settings = recipe.verify
    seeds = seeds or settings.seeds
    steps = steps or settings.steps
    guidance = guidance or settings.guidance_scale or default_guidance(judge)
    timings: dict[str, float] = {}

    plan = plan_probes(recipe, seeds=seeds, vocabulary=vocabulary, found=found_neighbours,
                       prompts_per_group=prompts_per_group, neighbours_per_edit=neighbours_per_edit)
    for group in plan.groups:  # fail on phrases the judge cannot recognise before generating
        for probe in group.probes:
            judge.label_of(probe.subject, probe.kind)
            if probe.replacement:
                judge.label_of(probe.replacement, probe.kind)

    keys = plan.image_keys()
    base_settings = lazy.settings if lazy is not None and base_pipe is lazy else None
    base_cache = (BaseImageCache.for_run(base_sha256=base_info.sha256, judge=judge_identity(judge, judge_dir),
                                         keys=keys, steps=steps, guidance=guidance, batch=batch,
                                         candidates=plan.candidates,
                                         settings=(base_settings if base_settings is not None
                                                   else pipeline_settings(base_pipe)))
                  if cache and base_info is not None and base_info.sha256 else None)
    base_view = base_cache.load() if base_cache is not None else None
    base_images = CACHED if base_view is not None else GENERATED if base_cache is not None else NOT_CACHED
    if base_view is None and lazy is not None:
        base_pipe = lazy.pipeline()  # not cached: the base model generates its images
        if base_cache is not None and base_settings is not None and pipeline_settings(base_pipe) != base_settings:
            # the configs did not tell the loaded pipeline's settings: key the entry by the real ones
            base_cache = BaseImageCache.for_run(base_sha256=base_info.sha256, judge=judge_identity(judge, judge_dir),
                                                keys=keys, steps=steps, guidance=guidance, batch=batch,
                                                candidates=plan.candidates, pipe=base_pipe)
    roles = (("base", base_pipe), ("edited", edited_pipe)) if base_view is None else (("edited", edited_pipe),)
    bar = tqdm(total=len(roles) * len(keys), desc="verify", unit="img", disable=not progress)
    images = {}
    try:
        for role, pipe in roles:
            bar.set_description(f"verify: {role} model")
            pipe.set_progress_bar_config(disable=True)
            started = time.perf_counter()
            images[role] = generate_plan_images(pipe, plan, steps=steps, guidance=guidance, batch=batch,
                                                progress=bar)
            timings[f"generate_{role}"] = time.perf_counter() - started
    finally:
        bar.close()

    started = time.perf_counter()
    if base_view is None:
        base_view = ModelView.judged(images["base"], judge, plan.candidates)
        if base_cache is not None:
            base_cache.save(base_view)
    groups = score_plan(plan, base_view, images["edited"], judge, clip_scale)
    gates = evaluate_gates(recipe, groups)
    timings["score"] = time.perf_counter() - started
    height, width = base_view.images.images.shape[1:3]
    return VerifyReport(
        recipe_path=str(recipe.path),
        recipe_sha256=recipe.sha256,
        edits=[{"concept": e.concept, "replacement": e.replacement, "attribute": e.attribute} for e in recipe.edits],
        base_model=(base_info or ModelInfo("base", "(in memory)")).to_dict(),
        edited_model=(edited_info or ModelInfo("edited", "(in memory)")).to_dict(),
        judge=judge.description,
        settings={
            "seeds": list(plan.seeds), "steps": steps, "guidance_scale": guidance, "clip_scale": clip_scale,
            "prompts_per_group": prompts_per_group,
            "neighbours_per_edit": recipe.neighbours if neighbours_per_edit is None else neighbours_per_edit,
            "vocabulary": vocabulary.name,
            "neighbours": {f"edits[{i}]": [{"concept": n, "similarity": None if sim is None else round(sim, 4)}
                                           for n, sim in checked]
                           for i, checked in (plan.neighbours or {}).items()},
            "images_per_model": len(keys), "image_size": [int(height), int(width)],
            "thresholds": {
                "efficacy_max_accuracy": settings.efficacy_max_accuracy,
                "fact_min_accuracy": settings.fact_min_accuracy,
                "generalization_max_accuracy": settings.generalization_max_accuracy,
                "specificity_max_drop": settings.specificity_max_drop,
            },
        },
        groups=groups,
        gates=gates,
        timings_seconds={k: round(v, 3) for k, v in timings.items()},
        base_images=base_images,
    )


def find_neighbours_on(pipe, recipe: Recipe, vocabulary) -> dict[int, list[tuple[str, float]]]:
    """Each edit's neighbours found on ``pipe``'s text encoder output (when no manifest says
    which ones compile used)."""
    from compiler import resolve

    avoid = [e.concept for e in recipe.edits] + [e.replacement for e in recipe.edits]
    return {i: [(n.phrase, n.similarity) for n in resolve.find_neighbours(
                pipe, vocabulary, e.concept, e.attribute, k=recipe.neighbours, avoid=avoid)]
            for i, e in enumerate(recipe.edits)} if recipe.neighbours > 0 else {}


def neighbours_from_manifest(edited_dir: Path, recipe: Recipe) -> dict[int, list[tuple[str, float]]] | None:
    """The neighbours compile found and kept put, from the edited folder's manifest.json, when
    it was compiled from this recipe."""
    path = Path(edited_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or (manifest.get("recipe") or {}).get("sha256") != recipe.sha256:
        return None  # compiled from another recipe: find them again on the base model
    edits = manifest.get("edits")
    if not isinstance(edits, list) or len(edits) != len(recipe.edits):
        return None
    if any(not isinstance(e, dict) or "neighbours" not in e or e.get("concept") != r.concept
           for e, r in zip(edits, recipe.edits)):
        return None
    return {i: [(n["concept"], float(n["similarity"])) for n in e["neighbours"]] for i, e in enumerate(edits)}


# --------------------------------------------------------------------------------------------
# From paths: what `editc verify` and `editc compile` call
# --------------------------------------------------------------------------------------------


@dataclass
class _OnnxModel:
    """An ``export_onnx`` folder loaded for verify: the sampler in place of a pipeline."""

    pipeline: object
    source_path: Path


def load_pipeline(path_or_toy: str | Path, role: str, device):
    """Load a model for verify as the device policy says (float32 on the CPU: reproducible;
    the checkpoint's half precision on a GPU); bad paths are ``UserError``. An
    ``export_onnx`` folder (the edited model only) runs on onnxruntime."""
    from compiler.device import device_policy
    from compiler.export.onnx_pipeline import OnnxTextToImage, is_onnx_folder, providers_for
    from compiler.models.load import load_for_generation

    device = device_policy(device)

    if is_onnx_folder(path_or_toy):
        if role == "base":
            raise UserError(f"{path_or_toy}: the base model must be a PyTorch model (diffusers folder, "
                            f"single file or 'toy'): the judge reads its text encoder; pass --base MODEL")
        runner = OnnxTextToImage(path_or_toy, providers=providers_for(device.device))
        return _OnnxModel(runner, Path(path_or_toy)), ModelInfo(role, str(path_or_toy), runner.family,
                                                                 runner.content_hash())

    loaded = load_for_generation(str(path_or_toy), device=device)
    info = ModelInfo(role, str(loaded.source_path), loaded.family, loaded.model_hash)
    return loaded, info


def base_model_of(edited_dir: Path, recipe: Recipe) -> str:
    """The base model an edited folder was compiled from (its manifest.json), else the
    recipe's model."""
    manifest_path = Path(edited_dir) / "manifest.json"
    if not manifest_path.is_file() and (Path(edited_dir) / "editc_onnx.json").is_file():
        manifest_path = Path(edited_dir).parent / "manifest.json"  # compile's onnx/ subfolder
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{manifest_path}: unreadable manifest ({err}); pass --base MODEL") from None
        path = (manifest.get("base_model") or {}).get("path") if isinstance(manifest, dict) else None
        if path:
            return str(path)
    return recipe.model




def verify_paths(recipe: Recipe, *, edited: str | Path, base: str | Path | None = None,
                 clip: str | Path | None = None, device: str | None = None, progress: bool = True,
                 cache: bool = True, **options) -> VerifyReport:
    """Load the edited and the base model and a judge, then :func:`run_verify` (the base
    model's images from the editc cache when ``cache`` and an earlier run left them)."""
    edited_dir = Path(edited)
    if not edited_dir.exists():
        raise UserError(f"{edited}: no such edited model (--edited wants the folder editc compile wrote)")
    from compiler.device import device_policy

    device = device_policy(device)
    base_spec = base if base is not None else base_model_of(edited_dir, recipe)
    found = neighbours_from_manifest(edited_dir, recipe)
    lazy = _lazy_base(base_spec, device) if cache and (found is not None or recipe.neighbours <= 0) else None
    if lazy is not None:  # its images may be cached: the base is loaded only if they are not
        base, base_info, stored_dtype = lazy
        base_text_encoder = None  # a toy judge reads the base's text tower from its folder
    else:
        base_loaded, base_info = load_pipeline(base_spec, "base", device)
        base, stored_dtype = base_loaded.pipeline, getattr(base_loaded, "stored_dtype", None)
        base_text_encoder = base_loaded.pipeline.text_encoder
    edited_loaded, edited_info = load_pipeline(edited_dir, "edited", device)
    base_dir = Path(base_info.path) if Path(base_info.path).is_dir() else None
    from compiler import resolve

    vocabulary = resolve.vocabulary_of(base_dir or base_info.path, recipe.vocabulary)
    judge = choose_judge(clip, base_dir, base_text_encoder, vocabulary, device.device)
    judge_dir = clip if clip is not None else toy_judge_folder_for(base_dir)
    report = run_verify(recipe, edited_loaded.pipeline, base, judge, progress=progress,
                        edited_info=edited_info, base_info=base_info, vocabulary=vocabulary,
                        found_neighbours=found if found is not None or lazy is None else {},
                        cache=cache, judge_dir=judge_dir, **options)
    report.settings["compute"] = device.describe(stored_dtype)
    return report


def _lazy_base(base_spec, device) -> tuple[LazyBase, ModelInfo, object] | None:
    """The base model without its weights (a diffusers folder whose pipeline settings its configs
    tell; else None: load it): a :class:`LazyBase`, its ``ModelInfo`` (content hash from the
    hash cache) and its stored dtype."""
    from compiler.export.onnx_pipeline import is_onnx_folder
    from compiler.models.load import inspect_source, source_hash
    from compiler.verify.base_cache import settings_from_source

    if is_onnx_folder(base_spec):
        return None  # load_pipeline says why an ONNX base cannot be judged
    source = inspect_source(str(base_spec))
    settings = settings_from_source(source, device)
    if settings is None:
        return None
    info = ModelInfo("base", str(source.path), source.family, source_hash(source))
    return LazyBase(settings, lambda: load_pipeline(base_spec, "base", device)[0].pipeline), info, source.stored_dtype


def verify_compiled(recipe: Recipe, *, edited_dir: str | Path, base, progress: bool = True,
                    report_dir: str | Path | None = None, device=None) -> dict:
    """Verify a freshly compiled folder and write its reports into ``edited_dir/verify``.

    ``base`` is the model compile started from: a path, "toy", or a ``LoadedModel`` (whose
    source is reloaded, because compile fuses the edit into its pipeline in place). Returns a
    summary for the manifest: ``passed``, ``failed`` (gate names), ``gates``, ``report``, ``base``
    (whether the base model's images were cached).
    """
    base_spec = getattr(base, "source_path", base)
    report = verify_paths(recipe, edited=edited_dir, base=base_spec, progress=progress, device=device)
    directory = Path(report_dir) if report_dir is not None else Path(edited_dir) / "verify"
    paths = write_reports(report, directory, force=True)
    return {
        "passed": report.passed,
        "failed": [gate.name for gate in report.failed_gates],
        "gates": {gate.name: ("skipped" if gate.skipped else "passed" if gate.passed else "failed")
                  for gate in report.gates},
        "report": str(paths["html"]),
        "base": report.base_images,
    }
