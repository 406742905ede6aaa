"""``editc compile``: recipe -> plan (resolve, locate) -> rows -> solve -> fuse -> export (-> verify).

Orchestration only; each step is a call into its own module: :mod:`compiler.plan` (methods,
layers, prompts), :mod:`compiler.methods` (each method's rows and closed-form solve),
:mod:`compiler.fuse` (write weights), :mod:`compiler.export` (files), :mod:`compiler.manifest`,
:mod:`compiler.verify` (gates).

All LocoEdit edits of a recipe become rows of *one* ridge regression per context dimension:
the union of their located layers shares one factorization of ``XᵀX + λI`` for both K and V.
All Diff-QuickFix edits at one site likewise share one solve.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler import resolve
from compiler.errors import UserError
from compiler.fuse import fuse_weights
from compiler.manifest import build_manifest, provenance_for
from compiler.methods import REGISTRY
from compiler.methods.rows import RowContext, concept_weights, timed
from compiler.plan import PlannedEdit, choose_method, plan_edits, preservation_groups, preserve_prompts_for
from compiler.recipe import Edit, Recipe

__all__ = ["CompileResult", "PlannedEdit", "apply_to_pipeline", "choose_method", "compile_edits",
           "compile_to_disk", "concept_weights", "plan_edits", "preserve_prompts_for"]


@dataclass
class CompileResult:
    """New tensors by qualified name (``unet/...``, ``text_encoder/...``) and the manifest."""

    new_tensors: dict[str, torch.Tensor]
    plans: list[PlannedEdit]
    timings: dict[str, float] = field(default_factory=dict)
    solve_info: list[dict] = field(default_factory=list)
    preserve_prompts: list[str] = field(default_factory=list)
    preserve_groups: list = field(default_factory=list)  # compiler.plan.PreserveGroup


# EDITC_TEXT_EDITS_FIRST=0 (a measurement knob, like the EDITC_* row knobs): the UNet solve reads
# the base text encoder, as before issue 25's "Text edits first".
TEXT_EDITS_FIRST = os.environ.get("EDITC_TEXT_EDITS_FIRST", "1") != "0"


def compile_edits(recipe: Recipe, model, plans: list[PlannedEdit], preserve_cache: bool | None = None,
                  concept_weighting: str = "concept") -> CompileResult:
    """Rows and solve for every method the plans use (text-encoder methods first); the model is not
    modified here. Prompts go through the one prompt encoder; the preservation rows' ``PᵀP``
    comes from the on-disk cache (``preserve_cache=False`` bypasses it); old weights come from
    ``model.read_tensors`` (a lazily read model reads just those). ``concept_weighting``: how the
    edits' rows weigh in one solve (``compiler.methods.rows.concept_weights``; "row" only for the
    benchmark's comparison)."""
    groups = preservation_groups(recipe, plans, resolve.vocabulary_of(model, recipe.vocabulary))
    context = RowContext(model, plans, groups, recipe.lambda_, preserve_cache=preserve_cache,
                         concept_weighting=concept_weighting)
    preserve = context.preserve
    contexts = [context]
    new_tensors: dict[str, torch.Tensor] = {}
    solve_info: list[dict] = []
    # Text-encoder edits first; the UNet edits are then solved on the contexts that the *edited*
    # text encoder produces, i.e. on what the UNet will see. Solved on the base encoder's, a
    # fact's Diff-QuickFix edit beside a style's LocoEdit shifted the style's contexts under the
    # UNet edit (van gogh beside the british monarch kept 0.27 of its K/V gap instead of 0.14:
    # README "Many concepts in one solve").
    for method in sorted(REGISTRY.values(), key=lambda m: m.edits_unet_layers):
        group = [p for p in plans if p.method == method.name]
        if not group:
            continue
        text_edits = {n: t for n, t in new_tensors.items() if not n.startswith("unet/")}
        if method.edits_unet_layers and text_edits and not context.text_edits and TEXT_EDITS_FIRST:
            context = RowContext(model, plans, groups + text_edited_group(recipe, plans), recipe.lambda_,
                                 preserve_cache=preserve_cache, timings=context.timings, text_edits=text_edits,
                                 concept_weighting=concept_weighting)
            contexts.append(context)
        with context.text_encoders_edited():
            with timed(context.timings, "embed"):
                rows = method.build_rows(context, group)
            with timed(context.timings, "solve"):
                for solved in method.solve(context, group, rows):
                    new_tensors.update(solved.new_tensors)
                    solve_info.append(solved.info)
    used = [stats for stats in (c.cache_stats() for c in contexts) if stats is not None]
    if solve_info and used:
        stats, row_stats = used[0]
        for grams, rows in used[1:]:
            stats.add(grams)
            row_stats.add(rows)
        solve_info[0]["preserve_cache"] = stats.to_dict()
        if row_stats.hits or row_stats.misses:
            solve_info[0]["edit_rows_cache"] = row_stats.to_dict()
    return CompileResult(new_tensors, plans, context.timings, solve_info, preserve, groups)


def text_edited_group(recipe: Recipe, plans: list[PlannedEdit]) -> list:
    """For the UNet solve after the text-encoder edits: the text-edited concepts' own prompts,
    held where the edited text encoder puts them (weighted like the concepts at risk), so the
    UNet edits keep what the text edits made (the british monarch, now king charles, beside 100
    styles). Prompts naming a concept the UNet edits are left out."""
    from compiler.plan import PreserveGroup
    from compiler.prompts.templates import PhraseSet

    unet_concepts = PhraseSet([p.edit.concept for p in plans if p.method_plugin.edits_unet_layers])
    prompts = tuple(dict.fromkeys(pair.source for p in plans if not p.method_plugin.edits_unet_layers
                                  for pair in p.pairs if not unet_concepts.mentioned_in(pair.source)))
    # EDITC_TEXT_EDITED_WEIGHT: a measurement knob (0: not held; README "Real-world words, …").
    weight = float(os.environ.get("EDITC_TEXT_EDITED_WEIGHT") or recipe.neighbour_weight)
    return [PreserveGroup("text-edited", prompts, weight)] if prompts and weight > 0 else []


def apply_to_pipeline(pipe, new_tensors: dict[str, torch.Tensor]) -> None:
    fuse_weights(pipe, new_tensors)


def compile_to_disk(recipe: Recipe, *, model=None, out=None, formats=None, force: bool = False,
                    verify: bool | None = None, progress: bool = True, prediction_type: str | None = None,
                    resolution: str | None = None, device=None) -> dict:
    """The full job behind ``editc compile``; returns the manifest (also written to disk).

    ``device``: ``--device`` (see :mod:`compiler.device`; default ``$EDITC_DEVICE``, else cuda
    when available). Only the text encoder(s) and the edited tensors go there; the UNet is read
    only for verify, ONNX or LocoGen. The output is claimed (checked against the inputs, locked,
    its folder writable) before the model is loaded; it appears under its name only when
    complete (``compiler.io``)."""
    from compiler.device import device_policy

    timings: dict[str, float] = {}
    first = not _IMPORTED
    with timed(timings, "imports"):  # Python imports, so that "load" means reading the model
        policy = device_policy(device)
        policy.initialize_async()  # the GPU's context comes up while the model is read
        _import_compile_modules()
    if first:  # and what the process imported before (torch, editc): since editc's import began
        import compiler

        timings["imports"] = time.perf_counter() - compiler.IMPORT_STARTED
    from compiler.export.diffusers_folder import write_manifest
    from compiler.export.formats import ExportJob, write_formats
    from compiler.io import claim_output, input_paths
    from compiler.models.load import LoadedModel
    from compiler.models.selective import open_model

    say = _reporter(progress)
    out, out_from = compile_output_path(recipe, out)
    formats = tuple(formats or recipe.outputs.formats)
    # `--out edited.safetensors` with the one format single-file: that file, not a folder
    single_file_out = Path(out).suffix.lower() == ".safetensors"
    if single_file_out and formats != ("single-file",):
        raise UserError(f"{out}: an output ending in .safetensors is one single file; use it with "
                        f"--format single-file alone (asked: {', '.join(formats)}), or give a folder")
    model_spec = model or recipe.model
    inputs = input_paths(model_spec, *([recipe.path] if Path(recipe.path).exists() else []))
    with claim_output(out, force=force, inputs=inputs, kind="file" if single_file_out else "dir") as claim:
        out = claim.path
        say("load model")
        with timed(timings, "load"):
            # Only what the compile edits is read: text encoders, tokenizers, the edited tensors.
            loaded = (model_spec if isinstance(model_spec, LoadedModel)
                      else open_model(model_spec, device=policy.device,
                                      prediction_type=prediction_type or recipe.prediction_type))
        peak_rss = {"load": _peak_rss_mb()}
        resolution = resolution or recipe.outputs.resolution
        say("plan edits (resolve, locate)")
        with timed(timings, "locate"):
            plans = plan_edits(recipe, loaded, locate_fn=_locate_fn(loaded, progress))
        peak_rss["locate"] = _peak_rss_mb()
        say("embed prompts and solve")
        result = compile_edits(recipe, loaded, plans)
        timings.update(result.timings)
        peak_rss["embed_solve"] = _peak_rss_mb()
        say(f"write {', '.join(formats)} to {out}")
        t0 = time.perf_counter()
        outputs: dict = {}
        manifest = build_manifest(recipe, loaded, result, timings, outputs)
        manifest["output"] = {"path": str(out), "from": out_from}
        policy = getattr(loaded, "policy", None) or policy  # a model opened elsewhere keeps its own
        manifest["compute"] = policy.describe(loaded.stored_dtype)
        manifest["peak_rss_mb"] = peak_rss  # the process's peak so far, after each stage
        manifest["model_reads"] = _model_reads(loaded)
        if single_file_out:
            return _write_single_file_only(recipe, loaded, result, out, manifest, timings, t0, force, verify,
                                           say, progress, resolution, policy)
        with claim.staging() as tmp:
            job = ExportJob(loaded, result.new_tensors, tmp, out, provenance_for(manifest), resolution)
            outputs.update(write_formats(formats, job))
            timings.update(job.timings)  # "fuse": a format asked for the edited pipeline
            timings["save"] = time.perf_counter() - t0 - job.timings.get("fuse", 0.0)
            manifest["timings_seconds"] = {k: round(v, 4) for k, v in timings.items()}
            peak_rss["save"] = _peak_rss_mb()
            manifest["model_reads"] = _model_reads(loaded)
            write_manifest(tmp, manifest)

        if verify if verify is not None else recipe.verify.enabled:
            from compiler.verify import verify_compiled

            say("verify")
            manifest["verify"] = verify_compiled(recipe, edited_dir=out, base=loaded, progress=progress,
                                                 device=policy.device)
            write_manifest(out, manifest)
    return manifest


def _write_single_file_only(recipe, loaded, result, out, manifest, timings, t0, force, verify, say, progress,
                            resolution, policy):
    """``--out X.safetensors --format single-file``: that one file (no manifest folder); the
    verify report goes beside it."""
    from compiler.export.single_file import export_single_file

    export_single_file(result.new_tensors, loaded, out, provenance_for(manifest), force=force, resolution=resolution)
    manifest["outputs"]["single-file"] = str(out)
    timings["save"] = time.perf_counter() - t0
    manifest["timings_seconds"] = {k: round(v, 4) for k, v in timings.items()}
    if verify if verify is not None else recipe.verify.enabled:
        from compiler.verify import verify_compiled

        say("verify")
        manifest["verify"] = verify_compiled(recipe, edited_dir=out, base=loaded, progress=progress,
                                             report_dir=Path(out).with_name(Path(out).stem + "-verify"),
                                             device=policy.device)
    return manifest


def compile_output_path(recipe: Recipe, out=None):
    """(path, where it came from): ``--out`` as given (``~`` expanded, "" refused), else the
    recipe's ``outputs.dir`` taken from the recipe's folder (an absolute one is allowed and
    said in the summary), else ``out/<recipe name>`` in the working folder."""
    from compiler.io.paths import expand, resolve_recipe_output

    if out is not None:
        return expand(out), "--out"
    if recipe.outputs.dir is not None:
        path, absolute = resolve_recipe_output(recipe.path, recipe.outputs.dir)
        return path, "the recipe's outputs.dir (an absolute path)" if absolute else "the recipe's outputs.dir"
    return expand(Path("out") / Path(recipe.path).stem), "the default out/<recipe name>"


_IMPORTED = False


def _import_compile_modules() -> None:
    """Import what a compile runs (transformers' CLIP, safetensors, the exporters) once per
    process, so that the manifest's ``imports`` holds it and ``load`` is reading the model."""
    global _IMPORTED
    if _IMPORTED:
        return
    import diffusers.models
    import safetensors.torch  # noqa: F401
    import transformers
    from diffusers.models import AutoencoderKL, UNet2DConditionModel  # noqa: F401 - configs are read as these
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import compiler.export.diffusers_folder  # noqa: F401
    import compiler.export.formats  # noqa: F401
    import compiler.models.selective  # noqa: F401
    del transformers, diffusers
    _IMPORTED = True


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MiB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
    except (ImportError, OSError):
        return None


def _model_reads(loaded) -> dict:
    """What the compile read of the checkpoint: tensors read lazily, and whether the whole
    pipeline (UNet, VAE) was built (only verify, ONNX or LocoGen need it)."""
    return {"tensors_read": getattr(loaded, "tensors_read", None), "pipeline_loaded": bool(loaded.pipeline_loaded)}


def _reporter(progress: bool):
    def say(message: str) -> None:
        if progress:
            print(f"[editc] {message}", file=sys.stderr, flush=True)

    return say


def _locate_fn(loaded, progress: bool):
    """LocoGen for edits without a known location (cached by model hash and settings)."""

    def run(edit: Edit):
        from compiler.locate import locate_cached

        return locate_cached(loaded, edit.concept, edit.replacement, edit.attribute, progress=progress)

    return run
