"""Write an edited model as a diffusers folder, touching only what changed.

Files that did not change are placed by ``compiler.io.link_or_copy`` (a reflink, a hard link
for large weight files only, else a copy: an output's configs never share an inode with the
input's); a component with edited tensors gets its weight file rewritten
with the same keys, order, dtypes and metadata, every other tensor bit-identical. The caller
(``compiler.io``) assembles the output in a temporary folder beside the target and renames it
into place, so a reader never sees half a model; the source is never opened for writing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compiler.fuse import split_name
from compiler.io import link_or_copy, write_atomically
from compiler.models.safetensors_file import SAFETENSORS_DTYPES, SafetensorsFile, patch_safetensors_copy


def _patch_safetensors(src: Path, dst: Path, replacements: dict[str, torch.Tensor],
                       extra_metadata: dict[str, str] | None = None) -> list[str]:
    """Copy ``src`` to ``dst`` byte for byte, overwriting only the replaced tensors' ranges and
    adding ``extra_metadata`` to the header (byte-identical output for identical inputs)."""
    table = SafetensorsFile.read(src)
    casted = {}
    for key, value in replacements.items():
        dtype = SAFETENSORS_DTYPES[table.entries[key]["dtype"]]
        casted[key] = value.detach().to(dtype=dtype).contiguous().reshape(table.entries[key]["shape"])
    metadata = dict(table.metadata or {})
    metadata.update(extra_metadata or {})
    patch_safetensors_copy(table, dst, casted, metadata)
    return sorted(casted)


def _file_key(file_keys: set[str], param: str) -> str | None:
    """The key a parameter has in a component's file (transformers may add or drop
    ``text_model.``)."""
    for candidate in (param, "text_model." + param, param.removeprefix("text_model.")):
        if candidate in file_keys:
            return candidate
    return None


def write_diffusers_folder(source: Path, new_tensors: dict[str, torch.Tensor], tmp: Path,
                           extra_metadata: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Fill ``tmp`` from the diffusers folder ``source`` with ``new_tensors`` patched in.

    Returns {component: [file keys replaced]}. Every new tensor must land somewhere.
    """
    source = Path(source)
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for qualified, value in new_tensors.items():
        component, param = split_name(qualified)
        by_component.setdefault(component, {})[param] = value
    replaced: dict[str, list[str]] = {}
    for path in sorted(source.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(source)
        component = rel.parts[0] if len(rel.parts) > 1 else None
        edits = by_component.get(component)
        if edits and path.suffix == ".safetensors":
            file_keys = set(SafetensorsFile.read(path).keys())
            mapped = {}
            for param, value in edits.items():
                key = _file_key(file_keys, param)
                if key is not None:
                    mapped[key] = value
            if mapped:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                done = _patch_safetensors(path, tmp / rel, mapped, extra_metadata)
                replaced.setdefault(component, []).extend(done)
                continue
        link_or_copy(path, tmp / rel)
    for component, edits in by_component.items():
        if len(replaced.get(component, [])) != len(edits):
            raise RuntimeError(f"{component}: could not place every edited tensor in {source / component}")
    return replaced


def write_manifest(tmp: Path, manifest: dict) -> None:
    write_atomically(Path(tmp) / "manifest.json", json.dumps(manifest, indent=2, sort_keys=False) + "\n", force=True)


def write_output(job) -> dict:
    """Compile's ``diffusers`` format (:mod:`compiler.export.formats`): the base folder with only
    the edited tensors rewritten, or converted from the single file
    without building the pipeline."""
    loaded = job.loaded
    if loaded.source_format == "diffusers":
        write_diffusers_folder(Path(loaded.source_path), job.new_tensors, job.folder, job.provenance)
    else:  # streamed from the single file, tensor by tensor, in its dtype
        write_diffusers_from_single_file(loaded, job.new_tensors, job.folder, job.provenance)
    return {"diffusers": str(job.out)}


# Weight file of each component in a diffusers folder (what from_pretrained looks for).
_WEIGHT_FILE = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def write_diffusers_from_single_file(model, new_tensors: dict[str, torch.Tensor], tmp: Path,
                                     extra_metadata: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Fill ``tmp`` with a diffusers folder converted from a single-file ``model`` (a
    ``LoadedModel``), ``new_tensors`` patched in, every tensor in the dtype the file stores it in.

    Nothing is built or held whole: the configs and tokenizers come from the family's config
    folder (with the file's own configs), and each component's weights are streamed tensor by
    tensor from the file (``write_safetensors_streamed``), so peak memory is one tensor.
    Returns {component: [edited tensor names]}.
    """
    import shutil

    from compiler.models.configs import config_folder
    from compiler.models.layout import single_file_components, original_name
    from compiler.models.load import build_meta, inspect_source
    from compiler.models.safetensors_file import write_safetensors_streamed
    from compiler.models.selective import TensorReader

    source = getattr(model, "source", None) or inspect_source(model.source_path, model.prediction_type)
    reader = TensorReader(source)
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for qualified, value in new_tensors.items():
        component, param = split_name(qualified)
        by_component.setdefault(component, {})[param] = value
    with config_folder(source.family, source.configs) as configs:
        for path in sorted(Path(configs).rglob("*")):
            if path.is_file():
                target = tmp / path.relative_to(configs)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)  # follows the shipped tokenizer links
    metadata = {"format": "pt", **(extra_metadata or {})}
    replaced: dict[str, list[str]] = {}
    for component in single_file_components(source.family):
        module = build_meta(source.configs, component, str(source.path))
        names = [n for n in module.state_dict() if not n.endswith("position_ids")]
        shapes = {n: tuple(module.state_dict()[n].shape) for n in names}
        edits = dict(by_component.pop(component, {}))
        dtypes = {}
        for name in names:  # dtypes from the file's header: nothing read yet
            original = original_name(source.family, f"{component}/{name}", source.configs)
            dtypes[name] = reader.stored_dtype(source.path, original)

        def produce(name: str, component=component, edits=edits, shapes=shapes, dtypes=dtypes) -> torch.Tensor:
            value = next((edits.pop(k) for k in (name, "text_model." + name, name.removeprefix("text_model."))
                          if k in edits), None)
            if value is not None:
                replaced.setdefault(component, []).append(name)
                return value.detach().cpu().to(dtypes[name]).reshape(shapes[name]).contiguous()
            return reader.read(f"{component}/{name}").reshape(shapes[name]).contiguous()

        out = tmp / component / _WEIGHT_FILE[component]
        out.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors_streamed({n: (dtypes[n], shapes[n]) for n in names}, produce, out, metadata)
        if edits:
            raise RuntimeError(f"{component}: edited tensors {sorted(edits)} have no place in the model")
    if by_component:
        raise RuntimeError(f"edited tensors of {sorted(by_component)} have no place in a {source.family} folder")
    return replaced
