"""``editc compile``: recipe -> resolve -> locate -> solve -> fuse -> export (-> verify).

This module wires the stages together; each stage lives in its own module:
``compiler.recipe`` (what), ``compiler.resolve`` (prompts, tokens, embeddings),
``compiler.locate`` (which layers), ``compiler.solve`` (closed form), ``compiler.fuse``
(write weights), ``compiler.export`` (files), ``compiler.verify`` (gates).

All LocoEdit edits of a recipe become rows of *one* ridge regression per context dimension:
the union of their located layers shares one factorization of ``XᵀX + λI`` for both K and V.
All Diff-QuickFix edits likewise share one solve for the text encoder's layer-0 ``out_proj``
(or, at the ``v_proj`` site, one per attention head).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from compiler import resolve, solve
from compiler.errors import UserError
from compiler.fuse import fuse_weights, get_parameter
from compiler.models.families import FAMILIES, known_location
from compiler.recipe import Edit, Recipe, default_eos

METHODS = ("locoedit", "quickfix", "neurons")
NAMED_PRESERVE_PROMPTS = 24  # template prompts per concept named in ``preserve``


@dataclass
class PlannedEdit:
    """An edit after resolve: its method, layers and prompt pairs, and why."""

    edit: Edit
    method: str
    method_reason: str
    layers: tuple[int, ...]
    layers_source: str  # "recipe" | "family default" | "locate" | "n/a"
    pairs: list[resolve.PromptPair]
    lam: float
    site: str | None = None  # quickfix: "out_proj" | "v_proj"; None for UNet methods
    eos: bool = True  # remap EOS (and, for UNet methods, padding) rows too


@dataclass
class CompileResult:
    """New tensors by qualified name (``unet/...``, ``text_encoder/...``) and the manifest."""

    new_tensors: dict[str, torch.Tensor]
    plans: list[PlannedEdit]
    timings: dict[str, float] = field(default_factory=dict)
    solve_info: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- plan
def choose_method(edit: Edit, family: str) -> tuple[str, str | None, str]:
    """(method, quickfix site or None, why)."""
    if family == "if":
        raise UserError(
            f"edit '{edit.concept}': DeepFloyd IF has no editable location (T5 is bidirectional; "
            f"LocoEdit fails there, see DESIGN.md); no method applies"
            + (f", not even the recipe's {edit.method}" if edit.method != "auto" else "")
        )
    if edit.method != "auto":
        site = (edit.site or "out_proj") if edit.method == "quickfix" else None
        return edit.method, site, "set in the recipe"
    if edit.attribute == "fact" and len(FAMILIES[family].text_encoders) == 1:
        # The text encoder's layer 0 resolves a fact: after it, "the british monarch" and its
        # old answer have near-identical states, so a UNet K/V edit moves both (measured on the
        # toy world, bench/edit_toy.py); layer 0's v_proj still sees them apart.
        return "quickfix", "v_proj", ("auto: Diff-QuickFix at the text encoder's layer-0 v_proj "
                                      "(a fact; keeps its old answer's own prompts)")
    return "locoedit", None, "auto: LocoEdit on the located cross-attention K/V (works on every CLIP-conditioned family)"


def plan_edits(recipe: Recipe, model, locate_fn=None, progress: bool = True) -> list[PlannedEdit]:
    """Pick method, layers and prompts for every edit.

    Layers come from the recipe, else the family's known location (the papers' table, only for
    checkpoints at the reference widths), else LocoGen (``locate_fn``, cached).
    """
    plans = []
    n_layers = len(model.registry.cross_attention)
    for i, edit in enumerate(recipe.edits):
        method, site, reason = choose_method(edit, model.family)
        pairs = resolve.prompt_pairs(edit.concept, edit.replacement, edit.attribute, edit.prompts)
        resolve.check_prompt_lengths(model.pipeline.tokenizer, pairs, edit.concept)  # before locating
        layers: tuple[int, ...] = ()
        source = "n/a"
        if method in ("locoedit", "neurons"):
            layers, source = _layers_for(edit, model, locate_fn, progress)
            bad = [j for j in layers if j >= n_layers]
            if bad:
                raise UserError(
                    f"{recipe.path}: edits[{i}].layers: {bad} out of range; this model has "
                    f"{n_layers} cross-attention layers (0..{n_layers - 1})"
                )
        lam = edit.lambda_ if edit.lambda_ is not None else recipe.lambda_
        eos = edit.eos if edit.eos is not None else default_eos(method, site)
        plans.append(PlannedEdit(edit, method, reason, tuple(layers), source, pairs, lam, site, eos))
    return plans


def _layers_for(edit: Edit, model, locate_fn, progress: bool) -> tuple[tuple[int, ...], str]:
    if isinstance(edit.layers, tuple):
        return edit.layers, "recipe"
    known = None
    if model.registry.matches_reference_widths:  # the papers' table holds at reference widths only
        known = known_location(model.family, edit.attribute)
    if known is not None and edit.layers in ("auto", "default", None):
        return tuple(known.layers), "family default (papers' table)"
    if edit.layers == "default":
        raise UserError(
            f"edit '{edit.concept}': no known default location for this {model.family} checkpoint "
            "(its widths differ from the papers' models); use layers: auto to run LocoGen"
        )
    if locate_fn is None:
        raise UserError(f"edit '{edit.concept}': no known location and locate is unavailable; set layers: [..]")
    result = locate_fn(edit)
    confirmation = getattr(result, "confirmation", None)
    if not result.passed:
        # No small window holds the concept on this model (the toy world spreads its knowledge
        # over most of the UNet).
        reason = f"all layers: LocoGen found no window of <= {result.best_size} layers that removes the concept"
    elif confirmation is not None and not confirmation.best.passed:
        # The sweep's cheap settings found a window that the full-settings run does not confirm:
        # trusting it would edit too little.
        reason = f"all layers: LocoGen's window {list(result.layers)} was not confirmed at {confirmation.steps} steps"
    else:
        return tuple(result.layers), "locate (LocoGen)"
    # Edit every cross-attention layer, as UCE does, and say why.
    return tuple(range(len(model.registry.cross_attention))), reason


# ----------------------------------------------------------------------------- rows
def _positions_by_prompt(tokenizer, plan: PlannedEdit, trailing_to: int | None = None):
    edit = plan.edit
    return resolve.pair_positions(tokenizer, plan.pairs, edit.concept, edit.replacement, plan.eos, trailing_to)


def preserve_prompts_for(recipe: Recipe, plans: list[PlannedEdit]) -> list[str]:
    """Default generic captions (without any edited concept) plus the recipe's preserve list."""
    avoid = [p.edit.concept for p in plans] + [p.edit.replacement for p in plans]
    prompts = resolve.default_preserve_prompts(avoid)
    # The replacement must keep meaning what it meant ("a painting" still looks like one).
    for plan in plans:
        prompts.extend(pair.target for pair in plan.pairs)
    named = set(recipe.preserve)
    for plan in plans:
        named.update(plan.edit.preserve)
    attributes = sorted({p.edit.attribute for p in plans})
    for name in sorted(named):
        for attribute in attributes:
            named_prompts = resolve.template_prompts(name, attribute)
            prompts.extend(named_prompts[:: max(1, len(named_prompts) // NAMED_PRESERVE_PROMPTS)])
    return list(dict.fromkeys(prompts))


def compile_edits(recipe: Recipe, model, plans: list[PlannedEdit], progress: bool = True) -> CompileResult:
    """Embed, solve and return the new tensors (the pipeline is not modified here)."""
    pipe = model.pipeline
    tokenizer = pipe.tokenizer
    timings: dict[str, float] = {}
    new_tensors: dict[str, torch.Tensor] = {}
    solve_info: list[dict] = []
    preserve = preserve_prompts_for(recipe, plans)

    by_method = defaultdict(list)
    for plan in plans:
        by_method[plan.method].append(plan)

    if by_method["locoedit"] or by_method["neurons"]:
        t0 = time.perf_counter()
        sources = [pr.source for p in plans for pr in p.pairs]
        targets = [pr.target for p in plans for pr in p.pairs]
        # Trailing (EOS and padding) rows need the pipeline's full 77-token contexts.
        full = any(p.eos for p in plans if p.method != "quickfix")
        contexts = resolve.encode_context(pipe, sources + targets + preserve, full_length=full)
        src_ctx, tgt_ctx = contexts[: len(sources)], contexts[len(sources) : len(sources) + len(targets)]
        pres_ctx = contexts[len(sources) + len(targets) :]
        timings["embed"] = timings.get("embed", 0.0) + time.perf_counter() - t0

        offset = 0
        rows_by_plan = {}
        for plan in plans:
            n = len(plan.pairs)
            s_pos, t_pos = _positions_by_prompt(tokenizer, plan, contexts.shape[1] if full else None)
            rows_by_plan[id(plan)] = (
                resolve.gather_rows(src_ctx[offset : offset + n], s_pos),
                resolve.gather_rows(tgt_ctx[offset : offset + n], t_pos),
            )
            offset += n
        length = contexts.shape[1] if full else None
        preserve_rows = resolve.gather_rows(pres_ctx, resolve.all_token_positions(tokenizer, preserve, length))

        if by_method["locoedit"]:
            t0 = time.perf_counter()
            result, info = _solve_locoedit(model, by_method["locoedit"], rows_by_plan, preserve_rows, recipe.lambda_)
            new_tensors.update(result)
            solve_info.append(info)
            timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t0
        if by_method["neurons"]:
            t0 = time.perf_counter()
            result, info = _solve_neurons(model, by_method["neurons"], rows_by_plan)
            new_tensors.update(result)
            solve_info.append(info)
            timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t0

    for site, solver in (("out_proj", _solve_quickfix), ("v_proj", _solve_quickfix_values)):
        at_site = [p for p in by_method["quickfix"] if p.site == site]
        if at_site:
            result, info, t_embed, t_solve = solver(model, at_site, preserve, recipe.lambda_)
            new_tensors.update(result)
            solve_info.append(info)
            timings["embed"] = timings.get("embed", 0.0) + t_embed
            timings["solve"] = timings.get("solve", 0.0) + t_solve
    return CompileResult(new_tensors, plans, timings, solve_info)


def _solve_locoedit(model, plans, rows_by_plan, preserve_rows, recipe_lam):
    """One ridge regression for every LocoEdit edit: rows concatenated, layers united."""
    x_orig = torch.cat([rows_by_plan[id(p)][0] for p in plans])
    x_target = torch.cat([rows_by_plan[id(p)][1] for p in plans])
    # An edit's own λ enters as a row weight relative to the recipe's λ.
    weights = torch.cat([torch.full((len(rows_by_plan[id(p)][0]),), recipe_lam / p.lam) for p in plans])
    problem = solve.build_problem(x_orig, x_target, lam=recipe_lam, preserve=preserve_rows, row_weights=weights)
    layers = sorted({j for p in plans for j in p.layers})
    old = {}
    for layer in (model.registry.cross_attention[j] for j in layers):
        for name in (layer.to_k, layer.to_v):
            qualified = f"unet/{name}"
            old[qualified] = get_parameter(model.pipeline, qualified).detach()
    result = solve.solve_ridge(problem, old)
    info = {
        "method": "locoedit", "layers": layers, "rows": problem.n_rows, "preserve_rows": problem.n_preserve_rows,
        "context_dim": problem.dim, "lambda": recipe_lam, "condition_number": result.condition_number,
        "solve_seconds": result.seconds, "tensors": sorted(old),
    }
    return result.new_weights, info


def _solve_neurons(model, plans, rows_by_plan):
    """Neuron-level ablation: zero the top-k z-scored K/V output neurons of the located layers.

    SD's ``to_k``/``to_v`` have no bias, so a weight edit can only make a neuron output 0
    (the papers' public code sets them to the neutral group's mean at run time).
    """
    new = {}
    counts = {}
    for plan in plans:
        with_rows, without_rows = rows_by_plan[id(plan)]
        for j in plan.layers:
            layer = model.registry.cross_attention[j]
            for name in (layer.to_k, layer.to_v):
                qualified = f"unet/{name}"
                weight = new.get(qualified, get_parameter(model.pipeline, qualified).detach())
                w64 = weight.double()
                if plan.edit.neurons_top_k > w64.shape[0]:
                    raise UserError(f"edit '{plan.edit.concept}': neurons_top_k {plan.edit.neurons_top_k} exceeds "
                                    f"the {w64.shape[0]} output neurons of {qualified}; use at most {w64.shape[0]}")
                idx = solve.zscore_neurons(with_rows.double() @ w64.T, without_rows.double() @ w64.T, plan.edit.neurons_top_k)
                new[qualified] = solve.ablate_neurons(weight, None, idx).weight
                counts[qualified] = int(idx.numel())
    return new, {"method": "neurons", "tensors": sorted(new), "ablated": counts, "mode": "zero (no bias in K/V)"}


def _solve_quickfix(model, plans, preserve, recipe_lam):
    """Diff-QuickFix: the text encoder's layer-0 self-attention out_proj, one solve for all edits."""
    pipe = model.pipeline
    tokenizer = pipe.tokenizer
    spec = model.registry.text_layer0[0]
    out_proj = getattr(pipe, spec.component).get_submodule(spec.module_name)
    t0 = time.perf_counter()
    rows = _quickfix_rows(tokenizer, plans, recipe_lam)
    n = len(rows.sources)
    inputs = resolve.encode_context(pipe, rows.sources + rows.targets + preserve, capture=out_proj)
    keys = resolve.gather_rows(inputs[:n], rows.source_positions)
    target_keys = resolve.gather_rows(inputs[n : 2 * n], rows.target_positions)
    preserve_keys = resolve.gather_rows(inputs[2 * n :], resolve.all_token_positions(tokenizer, preserve))
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    qualified = f"{spec.component}/{spec.weight}"
    old = get_parameter(pipe, qualified).detach()
    values = target_keys.double() @ old.double().T  # what the unedited layer gives the replacement
    result = solve.solve_quickfix(keys, values, old, lam=recipe_lam, preserve_keys=preserve_keys, name=qualified,
                                  row_weights=rows.weights)
    info = {
        "method": "quickfix", "site": "out_proj", "rows": result.n_rows, "preserve_rows": result.n_preserve_rows,
        "lambda": recipe_lam, "condition_number": result.condition_number, "solve_seconds": result.seconds,
        "tensors": [qualified],
    }
    return result.new_weights, info, t_embed, time.perf_counter() - t0


@dataclass
class QuickFixRows:
    """The prompts and token positions of all Diff-QuickFix edits, in one order, and each key
    row's weight (an edit's own λ relative to the recipe's)."""

    sources: list[str]
    targets: list[str]
    source_positions: list[list[int]]
    target_positions: list[list[int]]
    weights: torch.Tensor


def _quickfix_rows(tokenizer, plans, recipe_lam) -> QuickFixRows:
    rows = QuickFixRows([], [], [], [], torch.empty(0))
    weights = []
    for plan in plans:
        s_pos, t_pos = _positions_by_prompt(tokenizer, plan)
        rows.sources += [pair.source for pair in plan.pairs]
        rows.targets += [pair.target for pair in plan.pairs]
        rows.source_positions += s_pos
        rows.target_positions += t_pos
        weights += [recipe_lam / plan.lam] * sum(len(p) for p in s_pos)
    rows.weights = torch.tensor(weights, dtype=torch.float64)
    return rows


def _solve_quickfix_values(model, plans, preserve, recipe_lam):
    """Diff-QuickFix at the layer-0 attention's ``v_proj``: keys mixed by that attention, per head."""
    pipe = model.pipeline
    tokenizer = pipe.tokenizer
    spec = model.registry.text_layer0[0]
    attention = getattr(pipe, spec.component).get_submodule(spec.module_name.rsplit(".", 1)[0])
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "num_heads")):
        raise UserError(f"{spec.component}: its layer-0 attention ({type(attention).__name__}) has no "
                        "separate q/k/v projections; use site: out_proj")
    t0 = time.perf_counter()
    rows = _quickfix_rows(tokenizer, plans, recipe_lam)
    positions = rows.source_positions + rows.target_positions + resolve.all_token_positions(tokenizer, preserve)
    mixed = resolve.attention_value_keys(pipe, spec.component, attention,
                                         rows.sources + rows.targets + preserve, positions)
    n = len(rows.weights)  # key rows per side (source and target positions pair up)
    keys, target_keys, preserve_keys = mixed[:, :n], mixed[:, n : 2 * n], mixed[:, 2 * n :]
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    weight_name = spec.weight.replace("out_proj.weight", "v_proj.weight")
    qualified = f"{spec.component}/{weight_name}"
    old = get_parameter(pipe, qualified).detach()
    result = solve.solve_value_heads(keys, target_keys, old, lam=recipe_lam, preserve_keys=preserve_keys,
                                     name=qualified, row_weights=rows.weights)
    info = {
        "method": "quickfix", "site": "v_proj", "heads": int(keys.shape[0]), "rows": result.n_rows,
        "preserve_rows": result.n_preserve_rows, "lambda": recipe_lam,
        "condition_number": result.condition_number, "solve_seconds": result.seconds, "tensors": [qualified],
    }
    return result.new_weights, info, t_embed, time.perf_counter() - t0


def apply_to_pipeline(pipe, new_tensors: dict[str, torch.Tensor]) -> None:
    fuse_weights(pipe, new_tensors)


# ----------------------------------------------------------------------------- the whole job
def build_manifest(recipe: Recipe, model, result: CompileResult, timings: dict[str, float], outputs: dict) -> dict:
    from compiler import __version__

    return {
        "tool": {"name": "editc", "version": __version__},
        "recipe": {"path": str(recipe.path), "sha256": recipe.sha256, "text": recipe.source_text},
        "base_model": {"path": str(model.source_path), "sha256": model.model_hash, "family": model.family,
                       "format": model.source_format},
        "lambda": recipe.lambda_,
        "edits": [
            {"concept": p.edit.concept, "replacement": p.edit.replacement, "attribute": p.edit.attribute,
             "method": p.method, "method_reason": p.method_reason, "layers": list(p.layers),
             "layers_source": p.layers_source, "prompt_pairs": len(p.pairs), "lambda": p.lam, "eos": p.eos,
             **({"site": p.site} if p.site else {})}
            for p in result.plans
        ],
        "solves": result.solve_info,
        "edited_tensors": sorted(result.new_tensors),
        "timings_seconds": {k: round(v, 4) for k, v in timings.items()},
        "outputs": outputs,
    }


def provenance_for(manifest: dict) -> dict[str, str]:
    """Strings for safetensors ``__metadata__``: what was done to this file, and to what."""
    from compiler.export.provenance import provenance_metadata

    return provenance_metadata(
        recipe_text=manifest["recipe"]["text"],
        base_model_sha256=manifest["base_model"]["sha256"],
        edited_tensors=manifest["edited_tensors"],
        method=",".join(sorted({e["method"] for e in manifest["edits"]})),
        lam=manifest["lambda"],
        layers=sorted({j for e in manifest["edits"] for j in e["layers"]}),
        # No timings here: identical inputs must give byte-identical files (they are in the manifest).
    )


def compile_to_disk(recipe: Recipe, *, model=None, out=None, formats=None, force: bool = False,
                    verify: bool | None = None, progress: bool = True, prediction_type: str | None = None,
                    resolution: str | None = None) -> dict:
    """The full job behind ``editc compile``; returns the manifest (also written to disk).

    The output is claimed (checked against the inputs, locked, its folder writable) before the
    model is loaded; it appears under its name only when complete (``compiler.io``)."""
    from pathlib import Path

    from compiler.export.diffusers_folder import write_diffusers_folder, write_manifest
    from compiler.io import claim_output, input_paths
    from compiler.models.load import load_model

    say = _reporter(progress)
    timings: dict[str, float] = {}
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
        t0 = time.perf_counter()
        say("load model")
        loaded = load_model(model_spec, prediction_type=prediction_type or recipe.prediction_type)
        resolution = resolution or recipe.outputs.resolution
        timings["load"] = time.perf_counter() - t0

        say("plan edits (resolve, locate)")
        t0 = time.perf_counter()
        plans = plan_edits(recipe, loaded, locate_fn=_locate_fn(loaded, progress), progress=progress)
        timings["locate"] = time.perf_counter() - t0

        say("embed prompts and solve")
        result = compile_edits(recipe, loaded, plans, progress=progress)
        timings.update(result.timings)

        t0 = time.perf_counter()
        apply_to_pipeline(loaded.pipeline, result.new_tensors)
        timings["fuse"] = time.perf_counter() - t0

        say(f"write {', '.join(formats)} to {out}")
        t0 = time.perf_counter()
        outputs = {}
        manifest = build_manifest(recipe, loaded, result, timings, outputs)
        manifest["output"] = {"path": str(out), "from": out_from}
        provenance = provenance_for(manifest)
        if single_file_out:
            from compiler.export.single_file import export_single_file

            export_single_file(result.new_tensors, loaded, out, provenance, force=force, resolution=resolution)
            outputs["single-file"] = str(out)
            timings["save"] = time.perf_counter() - t0
            manifest["timings_seconds"] = {k: round(v, 4) for k, v in timings.items()}
            if verify if verify is not None else recipe.verify.enabled:
                say("verify")
                from compiler.verify import verify_compiled

                manifest["verify"] = verify_compiled(recipe, edited_dir=out, base=loaded, progress=progress,
                                                     report_dir=Path(out).with_name(Path(out).stem + "-verify"))
            return manifest
        with claim.staging() as tmp:
            if "diffusers" in formats:
                if loaded.source_format == "diffusers":
                    write_diffusers_folder(Path(loaded.source_path), result.new_tensors, tmp, provenance)
                else:
                    loaded.pipeline.save_pretrained(tmp, safe_serialization=True)
                outputs["diffusers"] = str(out)
            _export_other_formats(loaded, result, formats, tmp, out, provenance, outputs, resolution)
            timings["save"] = time.perf_counter() - t0
            manifest["timings_seconds"] = {k: round(v, 4) for k, v in timings.items()}
            write_manifest(tmp, manifest)

        if verify if verify is not None else recipe.verify.enabled:
            say("verify")
            manifest["verify"] = _run_verify(recipe, loaded, out, progress)
            write_manifest(out, manifest)
    return manifest


def compile_output_path(recipe: Recipe, out=None):
    """(path, where it came from): ``--out`` as given (``~`` expanded, "" refused), else the
    recipe's ``outputs.dir`` taken from the recipe's folder (an absolute one is allowed and
    said in the summary), else ``out/<recipe name>`` in the working folder."""
    from pathlib import Path

    from compiler.io.paths import expand, resolve_recipe_output

    if out is not None:
        return expand(out), "--out"
    if recipe.outputs.dir is not None:
        path, absolute = resolve_recipe_output(recipe.path, recipe.outputs.dir)
        return path, "the recipe's outputs.dir (an absolute path)" if absolute else "the recipe's outputs.dir"
    return expand(Path("out") / Path(recipe.path).stem), "the default out/<recipe name>"


def _reporter(progress: bool):
    import sys

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


def _export_other_formats(loaded, result, formats, tmp, out, provenance, outputs, resolution=None) -> None:
    """single-file, delta and ONNX outputs, written into the same atomic folder."""
    if "single-file" in formats:
        from compiler.export.single_file import export_single_file

        path = tmp / "model.safetensors"
        export_single_file(result.new_tensors, loaded, path, provenance, resolution=resolution)
        outputs["single-file"] = str(out / path.name)
    if "delta" in formats:
        from compiler.export.delta import export_delta

        path = tmp / "delta.safetensors"
        export_delta(result.new_tensors, loaded, path, provenance)
        outputs["delta"] = str(out / path.name)
    if "onnx" in formats:
        from compiler.export.onnx import export_onnx, weights_as_stored

        with weights_as_stored(loaded.pipeline, result.new_tensors, loaded.stored_dtype):
            exported = export_onnx(loaded.pipeline, tmp / "onnx", provenance=provenance)
        outputs["onnx"] = str(out / "onnx")
        outputs["onnx_max_abs_error"] = exported.max_abs_errors()


def _run_verify(recipe, loaded, out, progress) -> dict:
    from compiler.verify import verify_compiled

    return verify_compiled(recipe, edited_dir=out, base=loaded, progress=progress)
