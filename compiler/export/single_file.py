"""Edited models as original single files (the layout A1111 and ComfyUI load).

From a single-file source the output is the source **copied byte for byte and patched tensor
by tensor**: the same tensor table (keys, dtypes, shapes, order, byte offsets), every other
tensor (EMA weights, vendor keys) untouched, the source's metadata kept, ModelSpec keys added
where missing, and the ``editc.*`` provenance added. Only the safetensors header is rewritten
(its metadata grows); the data section is streamed and the edited byte ranges overwritten.

From a diffusers folder the output is the family's original layout (``compiler.models.layout``
converts names and tensors), each tensor in the dtype of the source's weights, with the
component configs in the metadata (``compiler.models.configs.config_metadata``). Files are
written byte-identically for identical inputs (:func:`write_safetensors`).

Names of edited tensors are qualified diffusers names, ``<component>/<parameter>``, as
``compiler.fuse`` uses them. Where the original layout differs from diffusers' (OpenCLIP's
fused ``in_proj`` for q/k/v, the transposed ``text_projection``, the VAE attention's 1×1
convolutions), a patch rewrites the affected part of the original tensor.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from compiler.errors import UserError
from compiler.io import atomic_output_file
from compiler.export.provenance import check_provenance
from compiler.fuse import split_name
from compiler.models.layout import original_name, to_original_value
from compiler.models.safetensors_file import (SAFETENSORS_DTYPES, SafetensorsFile, patch_safetensors_copy,
                                              write_safetensors, write_safetensors_streamed)

def modelspec_architecture(family: str, prediction_type: str | None) -> str:
    """The family's ModelSpec architecture id for this prediction type (its ``Family`` table)."""
    from compiler.models.families import FAMILIES

    return FAMILIES[family].modelspec_architecture(prediction_type)


# Keys that hash the source's tensor data (ModelSpec, kohya sd-scripts' sshs_*, A1111's legacy
# hash): an edit changes the data, so they no longer hold and are dropped. The source's own
# hash stays known as editc.base_model_sha256.
_STALE_HASH_KEY = re.compile(r"^(modelspec\.hash_|sshs_)")


def modelspec_date() -> str:
    """Today (UTC, ISO-8601 date); ``SOURCE_DATE_EPOCH`` fixes it for byte-reproducible files."""
    import datetime

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
              else datetime.datetime.now(datetime.timezone.utc))
    return moment.date().isoformat()


def modelspec_resolution(family: str, configs: Mapping[str, Mapping] | None,
                         prediction_type: str | None) -> str | None:
    """``WxH`` the UNet works at: its sample size times the VAE's downsampling when the configs
    say, else the family's native size (SD-2: 768 for v, 512 for epsilon)."""
    unet, vae = (configs or {}).get("unet") or {}, (configs or {}).get("vae") or {}
    if unet.get("sample_size") and vae.get("block_out_channels"):
        side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    else:  # what the family's files were trained at (SD-2: by prediction type)
        from compiler.models.families import FAMILIES

        side = FAMILIES[family].resolution(prediction_type)
    return f"{side}x{side}" if side else None


def _recipe_summary(provenance: Mapping[str, str]) -> str:
    """'van gogh -> a painting; ...' from the recipe text in the provenance, else its hash."""
    import yaml

    try:
        recipe = yaml.safe_load(provenance.get("editc.recipe", "")) or {}
        edits = [f"{e['concept']} -> {e['replacement']}" if e.get("replacement") else f"remove {e['concept']}"
                 for e in recipe.get("edits", [])]
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):
        edits = []
    return "; ".join(edits) or provenance.get("editc.recipe_sha256", "")[:12]


def modelspec_metadata(source_metadata: Mapping[str, str], family: str, prediction_type: str | None,
                       provenance: Mapping[str, str], *, source_name: str | None = None,
                       resolution: str | None = None, configs: Mapping[str, Mapping] | None = None,
                       prediction_type_guessed: bool = False) -> dict[str, str]:
    """The edited file's metadata: the source's, less what no longer holds, ModelSpec keys, the
    provenance.

    - Hashes of the source's tensor data are dropped (the data changed); ``modelspec.date`` is
      the export's; ``modelspec.resolution`` is ``resolution`` when given, else the source's, else the
      UNet's size from ``configs``.
    - The title: the source's title (else its file or folder name) plus the recipe's method.
    - A prediction type that was guessed (an SD-2 file without metadata) is not written as a
      fact: no ``modelspec.prediction_type``, and ``editc.prediction_type_guessed`` says so.
    """
    from compiler.models.families import FAMILIES

    metadata = {k: v for k, v in source_metadata.items()
                if k.startswith("editc.") or not _STALE_HASH_KEY.search(k)}
    if provenance:
        metadata = {k: v for k, v in metadata.items() if not k.startswith("editc.")}
    metadata.setdefault("modelspec.sai_model_spec", "1.0.0")
    if prediction_type_guessed:
        metadata.pop("modelspec.prediction_type", None)
        metadata["editc.prediction_type_guessed"] = (
            f"{prediction_type}: the source does not record it; set it with --prediction-type")
        metadata.setdefault("modelspec.architecture", FAMILIES[family].modelspec_guessed_architecture
                            or modelspec_architecture(family, prediction_type))
    else:
        metadata.setdefault("modelspec.architecture", modelspec_architecture(family, prediction_type))
        if prediction_type is not None:
            metadata.setdefault("modelspec.prediction_type", "v" if prediction_type == "v_prediction" else "epsilon")
    if FAMILIES[family].modelspec_implementation:
        metadata.setdefault("modelspec.implementation", FAMILIES[family].modelspec_implementation)
    if resolution:
        metadata["modelspec.resolution"] = resolution
    elif not prediction_type_guessed:  # SD-2's size follows its prediction type: a guess too
        derived = modelspec_resolution(family, configs, prediction_type)
        if derived:
            metadata.setdefault("modelspec.resolution", derived)
    if provenance:
        metadata["modelspec.date"] = modelspec_date()
        base_title = source_metadata.get("modelspec.title") or source_name or "model"
        base_title = base_title.split(" (edited by editc")[0]
        method = provenance.get("editc.method", "edit")
        recipe = _recipe_summary(provenance)
        metadata["modelspec.title"] = f"{base_title} (edited by editc: {method}" + \
            (f", recipe {recipe})" if recipe else ")")
        note = (f"editc {method} edit, recipe sha256 {provenance.get('editc.recipe_sha256', '?')[:12]}, "
                f"base sha256 {provenance.get('editc.base_model_sha256', '?')[:12]}")
        description = source_metadata.get("modelspec.description", "")
        metadata["modelspec.description"] = f"{description}\n{note}".strip() if description else note
    metadata.update(provenance)
    return metadata


# --------------------------------------------------------------------------------------------
# Patching original tensors
# --------------------------------------------------------------------------------------------


def original_replacements(family: str, edited: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping],
                          read_current) -> dict[str, torch.Tensor]:
    """Original-layout tensors to write for the diffusers-named ``edited`` tensors.

    ``read_current(original_name)`` returns the tensor the checkpoint holds now; several
    diffusers tensors may patch one original tensor (OpenCLIP's q/k/v in one ``in_proj``).
    """
    replacements: dict[str, torch.Tensor] = {}
    for qualified in sorted(edited):
        original = original_name(family, qualified, configs)
        current = replacements.get(original)
        if current is None:
            current = read_current(original)
        replacements[original] = to_original_value(qualified, original, edited[qualified], current)
    return replacements


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    path: Path
    format: str  # "diffusers" | "single-file"
    family: str
    configs: dict[str, dict]
    metadata: dict[str, str]
    prediction_type: str | None
    prediction_type_guessed: bool = False


def _describe_source(source, prediction_type: str | None = None) -> _Source:
    from compiler.models.load import LoadedModel, inspect_source

    if isinstance(source, LoadedModel):  # its pipeline is not needed (and may not be built)
        inspected = getattr(source, "source", None) or inspect_source(source.source_path, source.prediction_type)
        return _Source(Path(source.source_path), source.source_format, source.family,
                       inspected.configs, dict(source.metadata), source.prediction_type,
                       source.prediction_type_guessed and inspected.prediction_type_guessed)
    inspected = inspect_source(source, prediction_type)
    return _Source(inspected.path, inspected.format, inspected.family, inspected.configs,
                   dict(inspected.metadata), inspected.prediction_type,
                   prediction_type_guessed=inspected.prediction_type_guessed)


def export_single_file(edited: Mapping[str, torch.Tensor], source, out_path: str | os.PathLike,
                       provenance: Mapping[str, str] | None = None, *, force: bool = False,
                       resolution: str | None = None, prediction_type: str | None = None) -> Path:
    """Write the edited model as an original single file at ``out_path`` (``.safetensors``).

    ``edited``: qualified diffusers names (``unet/...attn2.to_k.weight``) -> new tensors.
    ``source``: the unedited model, a ``LoadedModel`` or a path (single file or diffusers folder).
    ``provenance``: ``editc.*`` strings for the metadata. The write is atomic; an existing
    ``out_path`` is replaced only with ``force``; the source is never modified.
    ``resolution`` (``WxH``) and ``prediction_type`` (a path source only) state what an SD-2
    file without metadata cannot tell; without them a guess is marked as one.
    """
    metadata_in = check_provenance(provenance or {})
    if resolution is not None and not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", resolution):
        raise UserError(f"--resolution: {resolution!r} is not WIDTHxHEIGHT (e.g. 768x768)")
    described = _describe_source(source, prediction_type)
    from compiler.models.families import FAMILIES

    if not FAMILIES[described.family].has_single_file_format:
        raise UserError(f"{described.path}: {described.family} has no single-file format; export "
                        f"a diffusers folder or a delta instead")
    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"{out}: single-file output must end in .safetensors")
    metadata = modelspec_metadata(described.metadata, described.family, described.prediction_type,
                                  metadata_in, source_name=described.path.stem if described.path.suffix
                                  else described.path.name, configs=described.configs,
                                  resolution=resolution, prediction_type_guessed=described.prediction_type_guessed)
    with atomic_output_file(out, force=force, inputs=[described.path]) as temporary:
        if described.format == "single-file" and described.path.suffix.lower() == ".safetensors":
            table = SafetensorsFile.read(described.path)
            replacements = original_replacements(described.family, edited, described.configs, table.tensor)
            patch_safetensors_copy(table, temporary, replacements, metadata)
        elif described.format == "single-file":
            _write_from_ckpt(described, edited, temporary, metadata)
        else:
            _write_from_diffusers(described, edited, temporary, metadata)
    return out.absolute()


def _write_from_ckpt(described: _Source, edited, out_file: Path, metadata: Mapping[str, str]) -> None:
    """A .ckpt source: its state dict as safetensors, in the file's key order, patched."""
    from compiler.models.checkpoint import load_ckpt_state_dict

    tensors, _ = load_ckpt_state_dict(described.path)
    replacements = original_replacements(described.family, edited, described.configs, tensors.__getitem__)
    tensors.update(replacements)
    write_safetensors(tensors, out_file, metadata)


def _source_dtypes(folder: Path, component: str) -> dict[str, torch.dtype]:
    """The stored dtype of each tensor in a diffusers component's safetensors files."""
    from compiler.models.safetensors_file import read_safetensors_header

    dtypes: dict[str, torch.dtype] = {}
    for weights in sorted((folder / component).glob("*.safetensors")):
        if len(weights.name.split(".")) > 2:  # a variant (model.fp16.safetensors): not the default
            continue
        entries, _ = read_safetensors_header(weights)
        for name, entry in entries.items():
            dtypes[name.removeprefix("text_model.")] = SAFETENSORS_DTYPES[entry["dtype"]]
    return dtypes


def _write_from_diffusers(described: _Source, edited, out_file: Path, metadata: Mapping[str, str]) -> None:
    """A diffusers source: every component converted to the family's original layout, streamed
    tensor by tensor from the source's files (peak memory: one original tensor and its parts)."""
    from compiler.models.layout import (single_file_components, component_name_to_original, component_to_original,
                                        sd2_completion_tensor)
    from compiler.models.load import build_meta, inspect_source
    from compiler.models.selective import TensorReader

    source = inspect_source(described.path, described.prediction_type)
    reader = TensorReader(source)
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for qualified, value in edited.items():
        component, parameter = split_name(qualified)
        by_component.setdefault(component, {})[parameter] = value
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    parts: dict[str, tuple[str, dict, list[str]]] = {}  # original -> (component, config, diffusers names)
    meta_modules = {}
    for component in single_file_components(described.family):
        module = build_meta(source.configs, component, str(source.path))
        meta_modules[component] = module
        config = source.configs.get(component, {}) if component in ("unet", "vae") else {}
        state = module.state_dict()
        edits = by_component.pop(component, {})
        unknown = [p for p in edits if p not in state and "text_model." + p not in state
                   and p.removeprefix("text_model.") not in state]
        if unknown:
            raise UserError(f"{component}/{unknown[0]}: no such tensor in the model")
        stored = _source_dtypes(described.path, component)
        typed = {}
        for name, tensor in state.items():
            if name.endswith("position_ids"):
                continue
            typed[name] = tensor.to(stored.get(name.removeprefix("text_model."), torch.float32))
        for original, tensor in component_to_original(described.family, component, typed, config).items():
            entries[original] = (tensor.dtype, tuple(tensor.shape))
            parts.setdefault(original, (component, config, []))
        for name in typed:
            original = component_name_to_original(described.family, component, name, config)
            parts[original][2].append(name)
        by_component[f"_edits_{component}"] = edits  # kept for produce()
    leftover = [c for c in by_component if not c.startswith("_edits_")]
    if leftover:
        raise UserError(f"edited tensors of {', '.join(sorted(leftover))} have no place in a "
                        f"{described.family} single file")

    def produce(original: str) -> torch.Tensor:
        component, config, names = parts[original]
        if not names:  # added by the conversion itself (SD-2's pass-through block and projection)
            dtype, shape = entries[original]
            return sd2_completion_tensor(original, shape, dtype)
        edits = by_component[f"_edits_{component}"]
        tensors = {}
        for name in names:
            value = next((edits[k] for k in (name, "text_model." + name, name.removeprefix("text_model."))
                          if k in edits), None)
            base = reader.read(f"{component}/{name}")
            tensors[name] = base if value is None else value.detach().cpu().to(base.dtype).reshape(base.shape)
            if component == "vae" and tensors[name].shape != meta_modules[component].get_parameter(name).shape:
                tensors[name] = tensors[name].reshape(meta_modules[component].get_parameter(name).shape)
        out = component_to_original(described.family, component, tensors, config)[original]
        return out.contiguous()

    # The configs ride along, so that a model off the family's conventions (the toy model's
    # widths and heads, its VAE scaling factor, its scheduler) loads back exactly.
    from compiler.models.configs import config_metadata

    components = dict(meta_modules)
    if "scheduler" in source.configs:
        import diffusers

        scheduler_config = dict(source.configs["scheduler"])
        cls = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
        if cls is not None:
            components["scheduler"] = cls.from_config(scheduler_config)
    metadata = {**config_metadata(components), **metadata}
    write_safetensors_streamed(entries, produce, out_file, metadata)


def write_output(job) -> dict:
    """Compile's ``single-file`` format (:mod:`compiler.export.formats`)."""
    path = job.folder / "model.safetensors"
    export_single_file(job.new_tensors, job.loaded, path, job.provenance, resolution=job.resolution)
    return {"single-file": str(job.out / path.name)}


# --------------------------------------------------------------------------------------------
# ``editc export single-file`` (named by this format's registry entry)
# --------------------------------------------------------------------------------------------

def _echo_json(document: dict) -> None:
    import json

    click.echo(json.dumps(document, indent=2, default=str))


@click.command("single-file")
@click.argument("model")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Output .safetensors file.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="SD-2.x files without metadata: 512-base (epsilon) or 768-v (v_prediction); "
                   "written to modelspec.prediction_type instead of a guess.")
@click.option("--resolution", default=None, metavar="WxH",
              help="modelspec.resolution to write (default: the source's, else the UNet's size).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(model, out_path, force, prediction_type, resolution, as_json):
    """Write MODEL in its family's original single-file layout (A1111/ComfyUI).

    A diffusers folder is converted (its editc provenance carried over); a single file is
    copied with its metadata and ModelSpec keys completed.
    """
    from compiler.export.provenance import read_provenance
    from compiler.io import claim_output, input_paths
    from compiler.models.load import resolve_model_path

    started = time.perf_counter()
    with claim_output(out_path, force=force, inputs=input_paths(model), kind="file"):
        source = resolve_model_path(model)
        provenance = read_provenance(source)
        written = export_single_file({}, source, out_path, provenance, force=force,
                                     prediction_type=prediction_type, resolution=resolution)
    seconds = time.perf_counter() - started
    if as_json:
        _echo_json({"out": str(written), "seconds": seconds, "provenance": sorted(provenance)})
    else:
        click.echo(f"wrote {written} in {seconds:.1f} s")
