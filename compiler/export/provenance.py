"""Provenance: what was done to an artifact, as safetensors ``__metadata__`` strings.

Every artifact editc writes (diffusers weights, single file, delta, ONNX model metadata)
carries the same flat ``editc.*`` string keys, so any safetensors reader can tell an edited
checkpoint from its base and reproduce the edit:

- ``editc.version``            the tool version that wrote it
- ``editc.recipe_sha256``      SHA-256 of the recipe file's bytes
- ``editc.recipe``             the recipe text itself
- ``editc.base_model_sha256``  hash of the unedited model (``compiler.models.hashing``)
- ``editc.edited_tensors``     JSON list of the edited tensors' diffusers names
- ``editc.method``             locoedit | quickfix | neurons | ...
- ``editc.lambda``             the ridge regularizer λ
- ``editc.layers``             JSON list of edited cross-attention layer indices
- ``editc.solve_seconds``      (optional) the solve's wall time

safetensors metadata values must be strings; :func:`provenance_metadata` builds a valid set and
:func:`check_provenance` refuses anything else with a message naming the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from compiler import __version__
from compiler.errors import UserError

PREFIX = "editc."
REQUIRED_KEYS = ("editc.version", "editc.recipe_sha256", "editc.recipe", "editc.base_model_sha256",
                 "editc.edited_tensors", "editc.method", "editc.lambda", "editc.layers")


def recipe_sha256(recipe_text: str | bytes) -> str:
    data = recipe_text.encode() if isinstance(recipe_text, str) else recipe_text
    return hashlib.sha256(data).hexdigest()


def provenance_metadata(*, recipe_text: str, base_model_sha256: str, edited_tensors: Iterable[str],
                        method: str, lam: float, layers: Iterable[int],
                        solve_seconds: float | None = None,
                        extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``editc.*`` metadata of an edit, all values strings (safetensors requires it)."""
    metadata = {
        "editc.version": __version__,
        "editc.recipe_sha256": recipe_sha256(recipe_text),
        "editc.recipe": recipe_text,
        "editc.base_model_sha256": base_model_sha256,
        "editc.edited_tensors": json.dumps(sorted(edited_tensors)),
        "editc.method": method,
        "editc.lambda": repr(float(lam)),
        "editc.layers": json.dumps(sorted(int(n) for n in layers)),
    }
    if solve_seconds is not None:
        metadata["editc.solve_seconds"] = f"{solve_seconds:.3f}"
    for key, value in (extra or {}).items():
        metadata[key if key.startswith(PREFIX) else PREFIX + key] = value
    return check_provenance(metadata)


def check_provenance(metadata: Mapping[str, str], *, require_all: bool = False) -> dict[str, str]:
    """Validate provenance metadata: ``editc.``-prefixed string keys with string values."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            raise ValueError(f"provenance key {key!r} must be a string starting with '{PREFIX}'")
        if not isinstance(value, str):
            raise ValueError(f"provenance value of {key} must be a string (safetensors metadata "
                             f"holds strings only), got {type(value).__name__}")
        out[key] = value
    if require_all:
        missing = [k for k in REQUIRED_KEYS if k not in out]
        if missing:
            raise ValueError(f"provenance lacks {', '.join(missing)}")
    return out


def read_provenance(path: str | os.PathLike) -> dict[str, str]:
    """The ``editc.*`` metadata of a safetensors file, a diffusers folder or an ONNX folder.

    A diffusers folder's provenance is read from ``manifest.json`` when present, else from the
    first edited component's weights; an ONNX folder's from ``editc_onnx.json``.
    """
    from compiler.models.checkpoint import editc_metadata, read_safetensors_metadata

    path = Path(path)
    if path.is_file():
        if path.suffix == ".onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            return editc_metadata({p.key: p.value for p in model.metadata_props})
        return editc_metadata(read_safetensors_metadata(path))
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    for name in ("editc_onnx.json", "manifest.json"):
        if (path / name).is_file():
            document = json.loads((path / name).read_text())
            found = document.get("provenance")
            if isinstance(found, dict):
                return editc_metadata({str(k): str(v) for k, v in found.items()})
    for weights in sorted(path.glob("*/*.safetensors")):
        found = editc_metadata(read_safetensors_metadata(weights))
        if found:
            return found
    return {}


def describe_provenance(metadata: Mapping[str, str]) -> list[str]:
    """Human-readable lines for ``editc inspect``: one per key, the recipe indented below."""
    lines = []
    for key, value in sorted(metadata.items()):
        if key == "editc.recipe":
            continue
        if key == "editc.edited_tensors":
            try:
                names = json.loads(value)
            except ValueError:  # a comma-separated list
                names = [n for n in value.split(",") if n]
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            lines.append(f"{key}: {shown}")
        else:
            lines.append(f"{key}: {value}")
    if "editc.recipe" in metadata:
        lines.append("editc.recipe:")
        lines.extend("    " + line for line in metadata["editc.recipe"].splitlines())
    return lines
