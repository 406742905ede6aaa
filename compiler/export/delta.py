"""Delta files: only the edited tensors, and ``apply_delta`` to put them into a checkpoint.

A delta is a ``.safetensors`` file whose tensors are the edited ones under their qualified
diffusers names (``unet/…attn2.to_k.weight``), each in the dtype the base model stores it in;
a few hundred KB to a few MB for the papers' edits. Its ``__metadata__`` holds the edit's
provenance (``editc.*``) and:

- ``editc.delta.format``               ``editc-delta/1``
- ``editc.delta.family``               sd1 | sd2 | sdxl | if
- ``editc.delta.base_format``          the layout of the base it was made from
- ``editc.delta.base_model_sha256``    the base's hash (``compiler.models.hashing``)
- ``editc.delta.base_tensors_sha256``  hash of the base's values of the edited tensors, which
  is the same in both layouts (a diffusers folder and its single file hash differently)
- ``editc.delta.original_names``       JSON: qualified diffusers name -> single-file name

``apply_delta`` accepts a checkpoint in either layout as the delta's base when its hash is the
recorded one, or when it holds the recorded base values of every edited tensor (the same model
in the other layout); anything else is refused unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler.errors import UserError
from compiler.io import atomic_output_dir, atomic_output_file
from compiler.export.provenance import check_provenance
from compiler.export.single_file import export_single_file
from compiler.models.layout import original_names
from compiler.models.safetensors_file import (SAFETENSORS_DTYPES, SafetensorsFile, patch_safetensors_copy,
                                              write_safetensors)
from compiler.fuse import split_name

FORMAT = "editc-delta/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------
# Reading tensors of a checkpoint by their diffusers names, in either layout
# --------------------------------------------------------------------------------------------


def read_base_tensors(source, qualified_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds under these diffusers names, as stored (dtype, values).

    ``source`` is a ``ModelSource`` (``compiler.models.load.inspect_source``). Tensors that the
    single-file layout stores differently come back in diffusers form (a slice of OpenCLIP's
    ``in_proj``, the transposed ``text_projection``); VAE attention weights stay 1×1 convs.
    """
    from compiler.models.selective import TensorReader

    reader = TensorReader(source)
    out: dict[str, torch.Tensor] = {}
    for qualified in sorted(qualified_names):
        try:
            out[qualified] = reader.read(qualified)
        except UserError as err:
            raise UserError(f"{err}; the delta was made for another model") from None
    return out


def base_tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A layout-independent hash of tensor values: name and float32 values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        values = tensors[name].detach().to(torch.float32).contiguous().reshape(-1)
        digest.update(name.encode() + b"\n")
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _base_source(base):
    """A ModelSource for the base (LoadedModel or path), or None for a bare hash."""
    from compiler.models.load import LoadedModel, inspect_source

    if isinstance(base, LoadedModel):
        source = getattr(base, "source", None) or inspect_source(base.source_path, base.prediction_type)
        return source, base.model_hash
    if isinstance(base, str) and _SHA256.fullmatch(base) and not Path(base).exists():
        return None, base
    from compiler.models.load import source_hash

    source = inspect_source(base)
    return source, source_hash(source)


def export_delta(edited: Mapping[str, torch.Tensor], base, out_path: str | os.PathLike,
                 provenance: Mapping[str, str] | None = None, *, force: bool = False) -> Path:
    """Write the edited tensors as a delta file at ``out_path`` (``.safetensors``).

    ``edited``: qualified diffusers names -> new tensors. ``base``: the unedited model as a
    ``LoadedModel`` or a path (then each tensor is stored in the base's dtype, and the base's
    values are hashed so that the delta also applies to the base in the other layout), or just
    the base's SHA-256 (then only a checkpoint with that hash is its base).
    """
    if not edited:
        raise UserError("the delta would be empty: no edited tensors")
    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"{out}: a delta file must end in .safetensors")
    metadata = dict(check_provenance(provenance or {}))
    source, base_hash = _base_source(base)
    metadata["editc.delta.format"] = FORMAT
    metadata["editc.delta.base_model_sha256"] = base_hash
    metadata.setdefault("editc.base_model_sha256", base_hash)
    tensors = {name: value.detach().cpu().contiguous() for name, value in sorted(edited.items())}
    if source is not None:
        from compiler.models.families import FAMILIES

        stored = read_base_tensors(source, tensors)
        for name, value in tensors.items():
            if value.numel() != stored[name].numel():
                raise UserError(f"{name}: edited tensor has shape {list(value.shape)}, the base "
                                f"holds {list(stored[name].shape)}")
            tensors[name] = value.to(stored[name].dtype).reshape(value.shape).contiguous()
        metadata["editc.delta.family"] = source.family
        metadata["editc.delta.base_format"] = source.format
        metadata["editc.delta.base_tensors_sha256"] = base_tensors_sha256(stored)
        if FAMILIES[source.family].has_single_file_format:
            metadata["editc.delta.original_names"] = json.dumps(
                original_names(source.family, tensors, source.configs), sort_keys=True)
    with atomic_output_file(out, force=force) as temporary:
        write_safetensors(tensors, temporary, metadata)
    return out.absolute()


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------


@dataclass
class Delta:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def provenance(self) -> dict[str, str]:
        """The edit's provenance, without the delta-only keys."""
        return {k: v for k, v in self.metadata.items()
                if k.startswith("editc.") and not k.startswith("editc.delta.")}


def read_delta(delta_path: str | os.PathLike) -> Delta:
    path = Path(delta_path)
    if not path.is_file():
        raise UserError(f"{path}: no such delta file")
    table = SafetensorsFile.read(path)
    metadata = table.metadata
    if metadata.get("editc.delta.format") != FORMAT:
        raise UserError(f"{path}: not an editc delta file (metadata editc.delta.format is "
                        f"{metadata.get('editc.delta.format')!r}, expected '{FORMAT}')")
    tensors = {k: table.get_tensor(k) for k in sorted(table.keys())}
    return Delta(path, tensors, metadata)


def patch_diffusers_folder(source: Path, edited: Mapping[str, torch.Tensor], out_folder: Path,
                           metadata: Mapping[str, str]) -> None:
    """Fill ``out_folder`` from diffusers folder ``source`` with the ``edited`` tensors patched in.

    Weight files holding an edited tensor are copied byte for byte with those tensors'
    bytes overwritten (``patch_safetensors_copy``: same table, deterministic header, the
    provenance added to their metadata); every other file is hard-linked (copied where links
    are refused). Every edited tensor must land in some file.
    """
    from compiler.io import link_or_copy

    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for qualified, value in edited.items():
        component, parameter = split_name(qualified)
        by_component.setdefault(component, {})[parameter] = value
    placed: set[str] = set()
    for path in sorted(source.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(source)
        edits = by_component.get(relative.parts[0]) if len(relative.parts) > 1 else None
        if edits and path.suffix == ".safetensors":
            table = SafetensorsFile.read(path)
            replacements = {}
            for parameter, value in edits.items():
                key = next((k for k in (parameter, "text_model." + parameter,
                                        parameter.removeprefix("text_model.")) if k in table.entries), None)
                if key is not None:
                    entry = table.entries[key]
                    replacements[key] = value.to(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"]).contiguous()
                    placed.add(f"{relative.parts[0]}/{parameter}")
            if replacements:
                (out_folder / relative).parent.mkdir(parents=True, exist_ok=True)
                patch_safetensors_copy(table, out_folder / relative, replacements, {**table.metadata, **metadata})
                continue
        link_or_copy(path, out_folder / relative)
    missing = sorted(set(edited) - placed)
    if missing:
        raise UserError(f"{source}: holds no tensor {missing[0]} ({len(missing)} edited tensors have "
                        f"no place); the delta was made for another model")


@dataclass
class AppliedDelta:
    out: Path
    base_match: str  # "hash" | "tensors" (same weights, other layout) | "forced"
    tensors: int


def check_delta_shapes(delta: Delta, base: Mapping[str, torch.Tensor], base_path: Path) -> None:
    """Every delta tensor has the shape of the base tensor it replaces (before anything is
    written; ``--force`` does not lift this: a tensor of another shape cannot be patched in)."""
    for name, value in sorted(delta.tensors.items()):
        stored = base[name]
        if tuple(value.shape) != tuple(stored.shape) and not (
                name.startswith("vae/") and value.numel() == stored.numel()):  # 1x1 convs vs linears
            raise UserError(f"{delta.path}: tensor {name} has shape {list(value.shape)}, but {base_path} holds "
                            f"{list(stored.shape)}; the delta was made for another model (apply it to its base)")


def apply_delta(delta_path: str | os.PathLike, checkpoint_path: str | os.PathLike,
                out_path: str | os.PathLike, force: bool = False) -> AppliedDelta:
    """Apply a delta to a checkpoint (diffusers folder or single file), writing ``out_path``.

    The output has the checkpoint's layout: a diffusers folder (unchanged files hard-linked,
    edited weight files patched copies) or a patched copy of the single file; byte-identical
    for identical inputs. A checkpoint that is not the delta's base is refused
    unless ``force``; ``force`` also allows replacing an existing ``out_path``. The checkpoint
    itself is never modified.
    """
    from compiler.models.load import inspect_source, source_hash

    delta = read_delta(delta_path)
    source = inspect_source(checkpoint_path)
    family = delta.metadata.get("editc.delta.family")
    if family is not None and family != source.family:
        raise UserError(f"{source.path}: is a {source.family} model, but the delta {delta.path} was "
                        f"made for {family}")
    expected_hash = delta.metadata["editc.delta.base_model_sha256"]
    current = read_base_tensors(source, delta.tensors)
    check_delta_shapes(delta, current, source.path)
    actual_hash = source_hash(source, full=True)  # a safety check: the bytes, not the cache
    if actual_hash == expected_hash:
        match = "hash"
    else:
        if base_tensors_sha256(current) == delta.metadata.get("editc.delta.base_tensors_sha256"):
            match = "tensors"
        elif force:
            match = "forced"
        else:
            raise UserError(f"{source.path}: is not the delta's base model (its sha256 is "
                            f"{actual_hash[:16]}…, the delta was made for "
                            f"{expected_hash[:16]}…, and the edited tensors' base values differ); "
                            f"pass --force to apply it anyway")
    provenance = delta.provenance
    if source.format == "diffusers":
        out = Path(out_path)
        with atomic_output_dir(out, force=force, inputs=[source.path]) as folder:
            patch_diffusers_folder(source.path, delta.tensors, folder, provenance)
        written = out.absolute()
    else:
        if Path(out_path).suffix.lower() != ".safetensors":
            raise UserError(f"{out_path}: the output of a single-file checkpoint must end in "
                            f".safetensors")
        written = export_single_file(delta.tensors, source.path, out_path, provenance, force=force)
    return AppliedDelta(written, match, len(delta.tensors))


def write_output(job) -> dict:
    """Compile's ``delta`` format (:mod:`compiler.export.formats`)."""
    path = job.folder / "delta.safetensors"
    export_delta(job.new_tensors, job.loaded, path, job.provenance)
    return {"delta": str(job.out / path.name)}
