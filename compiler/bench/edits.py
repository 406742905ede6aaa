"""editc's own edits in the benchmark: recipes compiled in memory (as ``editc compile`` does
before export) and edited weights written into the loaded pipeline for a block."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import torch

from compiler.bench.baselines import BaselineResult, EditTask, synchronize
from compiler.bench.settings import EDITC_VARIANTS, NEEDS_LAYERS, BenchSettings
from compiler.fuse import fuse_weights, get_parameter


@contextmanager
def edited_weights(pipe, new_tensors: dict[str, torch.Tensor]):
    """Write ``new_tensors`` into the pipeline for the block, then put the old ones back."""
    saved = {name: get_parameter(pipe, name).detach().clone() for name in new_tensors}
    fuse_weights(pipe, new_tensors)
    try:
        yield
    finally:
        fuse_weights(pipe, saved)


def editc_recipe_text(model_path: str, edits: list[dict]) -> str:
    """A recipe (YAML) for in-memory compiles: ``edits`` hold concept, replacement, attribute,
    method and optionally layers (a tuple, "auto" or "default") and neurons_top_k."""
    lines = [f"model: {json.dumps(str(model_path))}", "edits:"]
    for edit in edits:
        lines.append(f"  - concept: {json.dumps(edit['concept'])}")
        lines.append(f"    replacement: {json.dumps(edit['replacement'])}")
        lines.append(f"    attribute: {edit['attribute']}")
        if edit.get("method"):
            lines.append(f"    method: {edit['method']}")
        layers = edit.get("layers")
        if layers is not None:
            lines.append(f"    layers: {layers if isinstance(layers, str) else list(layers)}")
        if edit.get("site"):
            lines.append(f"    site: {edit['site']}")
        if edit.get("neurons_top_k"):
            lines.append(f"    neurons_top_k: {edit['neurons_top_k']}")
    return "\n".join(lines) + "\n"


def layer_spec(layers) -> dict:
    """Recipe fields for an edit's layers: a tuple or "default" as given; a LocoGen result as
    ``layers: auto`` plus the result itself, which compile's own rule turns into layers (the
    located window when it passed, else every cross-attention layer)."""
    if hasattr(layers, "passed"):
        return {"layers": "auto", "located": layers}
    return {"layers": layers}


def editc_edit(loaded, edits: list[dict], label: str, concept_weighting: str = "concept") -> BaselineResult:
    """Compile a recipe in memory, as ``editc compile`` does before export: resolve, locate (from
    the LocoGen results handed in with the edits), embed, solve. ``concept_weighting``: see
    ``compiler.methods.rows.concept_weights`` ("row": every row weighs the same, for comparison)."""
    from compiler.compile import compile_edits, plan_edits
    from compiler.recipe import loads_recipe

    located = {edit["attribute"]: edit["located"] for edit in edits if "located" in edit}
    started = time.perf_counter()
    recipe = loads_recipe(editc_recipe_text(str(loaded.source_path), edits), f"{label}.yaml")
    plans = plan_edits(recipe, loaded, locate_fn=(lambda edit: located[edit.attribute]) if located else None)
    result = compile_edits(recipe, loaded, plans, concept_weighting=concept_weighting)
    synchronize(loaded.pipeline.unet.device)
    seconds = time.perf_counter() - started
    info = {"timings": result.timings, "solves": result.solve_info, "tensors": len(result.new_tensors),
            "layers": sorted({j for p in plans for j in p.layers}),
            "layers_source": sorted({p.layers_source.value for p in plans})}
    return BaselineResult(edits[0]["method"] if len(edits) == 1 else "locoedit", result.new_tensors, seconds, info)


def editc_edit_spec(task: EditTask, method: str, layers, settings: BenchSettings) -> dict:
    name, fields, _ = EDITC_VARIANTS[method]
    spec = {"concept": task.concept, "replacement": task.replacement, "attribute": task.attribute,
            "method": name, **fields}
    if method in NEEDS_LAYERS:
        spec.update(layer_spec(layers))
    if method == "neurons":
        spec["neurons_top_k"] = settings.neurons_top_k
    return spec
