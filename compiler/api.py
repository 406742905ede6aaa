"""The Python API: what ``editc compile`` does, callable from code and notebooks.

- :func:`compile_to_disk`: a recipe (a file's :class:`~compiler.recipe.Recipe`, or one built in
  code) to an edited checkpoint on disk, with its manifest; exactly ``editc compile``.
- :func:`apply_recipe`: edit a diffusers pipeline already in memory, on its device, in place
  (as UCE/TIME users do in notebooks); returns an :class:`EditReport` (what was edited, and
  ``undo()`` to put the old weights back).

Recipes built in code (``Recipe(edits=[Edit(...)])``) are validated by the same rules as files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compiler.compile import compile_edits, compile_to_disk
from compiler.recipe import Recipe, load_recipe, loads_recipe

__all__ = ["EditReport", "apply_recipe", "compile_to_disk", "in_memory_model", "load_recipe", "loads_recipe"]


@dataclass
class EditReport:
    """What :func:`apply_recipe` did to the pipeline."""

    family: str
    edits: list[dict]  # per edit: concept, replacement, method (and why), layers (and where from), λ, eos
    solves: list[dict]  # per solve: method, rows, preservation rows, condition number, seconds
    edited_tensors: list[str]  # qualified names (``unet/...``, ``text_encoder/...``)
    timings: dict[str, float]
    _pipeline: object = field(default=None, repr=False)
    _old: dict = field(default_factory=dict, repr=False)

    def undo(self) -> None:
        """Write the edited tensors' old values back into the pipeline."""
        from compiler.fuse import fuse_weights

        fuse_weights(self._pipeline, self._old)


def in_memory_model(pipe):
    """A diffusers pipeline object as compile's model: its family (detected from its
    components), its registry of editable layers; no file behind it."""
    from compiler.models.load import LoadedModel, detect_pipeline_family
    from compiler.models.registry import registry_from_components

    detection = detect_pipeline_family(pipe)
    registry = registry_from_components(detection.family, pipe.components, detection.matches_reference_widths)
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or "<in memory>"
    return LoadedModel(family=detection.family, pipeline=pipe, source_path=Path(str(name)),
                       source_format="in-memory", model_hash="", registry=registry, dtype=pipe.unet.dtype,
                       notes=registry.notes)


def apply_recipe(pipe, recipe: Recipe | str | Path, *, progress: bool = False) -> EditReport:
    """Edit ``pipe`` (a diffusers pipeline, on any device) in place as ``recipe`` says.

    ``recipe`` is a :class:`Recipe` or a recipe file's path; its ``model``, ``outputs`` and
    ``verify`` are not used. Layers come from the recipe, the family's known location, or
    LocoGen on this pipeline (cached by a hash of its weights).
    """
    import time

    from compiler.fuse import fuse_weights, get_parameter
    from compiler.plan import plan_edits

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    model = in_memory_model(pipe)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    plans = plan_edits(recipe, model, locate_fn=_locate_in_memory(model, progress))
    timings["locate"] = time.perf_counter() - started
    result = compile_edits(recipe, model, plans)
    timings.update(result.timings)
    old = {name: get_parameter(pipe, name).detach().clone() for name in result.new_tensors}
    started = time.perf_counter()
    fuse_weights(pipe, result.new_tensors)
    timings["fuse"] = time.perf_counter() - started
    from compiler.manifest import edit_entries

    return EditReport(model.family, edit_entries(result.plans), result.solve_info, sorted(result.new_tensors),
                      timings, pipe, old)


def _locate_in_memory(model, progress: bool):
    def run(edit):
        from compiler.locate import locate_cached
        from compiler.locate.cache import weights_fingerprint

        if not model.model_hash:  # the LocoGen cache is keyed by content: hash the weights once
            model.model_hash = weights_fingerprint(model.pipeline)
        return locate_cached(model, edit.concept, edit.replacement, edit.attribute, progress=progress)

    return run
