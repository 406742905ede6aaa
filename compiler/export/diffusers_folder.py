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
from safetensors import safe_open

from compiler.export.single_file import SAFETENSORS_DTYPES, SafetensorsTable, patch_safetensors_copy
from compiler.fuse import split_name
from compiler.io import link_or_copy, write_atomically


def _patch_safetensors(src: Path, dst: Path, replacements: dict[str, torch.Tensor],
                       extra_metadata: dict[str, str] | None = None) -> list[str]:
    """Copy ``src`` to ``dst`` byte for byte, overwriting only the replaced tensors' ranges and
    adding ``extra_metadata`` to the header (byte-identical output for identical inputs)."""
    table = SafetensorsTable.read(src)
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
            with safe_open(str(path), "pt") as f:
                file_keys = set(f.keys())
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
    the edited tensors rewritten, or the loaded pipeline saved when the base is a single file."""
    loaded = job.loaded
    if loaded.source_format == "diffusers":
        write_diffusers_folder(Path(loaded.source_path), job.new_tensors, job.folder, job.provenance)
    else:
        loaded.pipeline.save_pretrained(job.folder, safe_serialization=True)
    return {"diffusers": str(job.out)}
