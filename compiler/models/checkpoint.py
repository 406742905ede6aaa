"""Reading single-file checkpoints safely: names, shapes and metadata, with clear errors.

Nothing here reads tensor data from a ``.safetensors`` file: its header says everything
detection needs, read and validated by the one header reader,
:mod:`compiler.models.safetensors_file` (truncated downloads and hostile tables are refused
before any tensor is allocated). ``.ckpt`` files are read with
``torch.load(weights_only=True, mmap=True)`` (zip format only), which refuses pickled code.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler.errors import UserError
from compiler.models.safetensors_file import (SAFETENSORS_NAMES, read_safetensors_header,  # noqa: F401 (re-exported)
                                              read_safetensors_metadata, torch_dtype)

SAFETENSORS_SUFFIXES = (".safetensors",)
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + CKPT_SUFFIXES


@dataclass
class SingleFileHeader:
    path: Path
    format: str  # "safetensors" | "ckpt"
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)
    global_step: int | None = None  # .ckpt training step, when stored (SD-2 512-base: 875000)


_PARAMETER_SUFFIXES = (".weight", ".bias")

_MAX_WRAPPING = 8  # state_dict inside state_dict ... (Lightning: one or two levels)


def load_ckpt_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The tensors of a ``.ckpt`` file (unwrapping ``state_dict``) and its ``global_step``.

    Bounded: only torch's zip format (every SD checkpoint since torch 1.6), stored uncompressed,
    memory-mapped, so no tensor can take more memory than the file holds; a safe unpickler
    (``weights_only``) that refuses code; at most a few levels of ``state_dict`` wrapping."""
    import warnings

    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); expected a .ckpt checkpoint")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise UserError(f"{path}: truncated or corrupt .ckpt checkpoint (its zip directory is "
                                f"missing); download or copy it again")
        raise UserError(f"{path}: not a torch zip checkpoint (a raw pickle, the pre-1.6 torch format, or "
                        f"another file); editc reads .ckpt/.pt files saved by torch >= 1.6, or .safetensors")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"{path}: truncated or corrupt .ckpt checkpoint ({err})") from None
    if any(m.compress_type != zipfile.ZIP_STORED for m in members) or sum(m.file_size for m in members) > size:
        raise UserError(f"{path}: not a torch checkpoint (a compressed zip archive); editc reads .ckpt "
                        f"files saved by torch.save, or .safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about pickle protocols: not for users
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UserError(f"{path}: the checkpoint holds pickled Python objects that a safe "
                            f"load (torch.load weights_only=True) refuses; convert it to "
                            f".safetensors with a tool you trust") from None
        raise UserError(f"{path}: not a readable .ckpt checkpoint ({first[:200]})") from None
    except MemoryError:
        raise UserError(f"{path}: the .ckpt declares more data than fits in memory; it is corrupt") from None
    except Exception as err:  # any failure of the unpickler on foreign bytes is a bad file, not a bug
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(f"{path}: truncated or corrupt .ckpt checkpoint ({first[:200]})") from None
    global_step = None
    depth = 0
    while isinstance(obj, dict) and "state_dict" in obj:
        depth += 1
        if depth > _MAX_WRAPPING or obj["state_dict"] is obj:
            raise UserError(f"{path}: the .ckpt's state_dict is nested more than {_MAX_WRAPPING} levels deep "
                            f"(or contains itself); it is corrupt")
        if isinstance(obj.get("global_step"), int):
            global_step = obj["global_step"]
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: the .ckpt holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for name, tensor in tensors.items():
        if name.endswith(_PARAMETER_SUFFIXES) and not tensor.is_floating_point():
            raise UserError(f"{path}: tensor {name[:80]!r} is {tensor.dtype}; editc reads float checkpoints "
                            f"only, not quantized or integer weights")
    return tensors, global_step


def read_single_file(path: str | Path) -> SingleFileHeader:
    """Names, shapes, dtypes and metadata of an original single-file checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        header, metadata = read_safetensors_header(path)
        shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in header.items()}
        dtypes = {k: str(v["dtype"]) for k, v in header.items()}
        return SingleFileHeader(path, "safetensors", shapes, dtypes, metadata)
    if suffix in CKPT_SUFFIXES:
        tensors, global_step = load_ckpt_state_dict(path)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        dtypes = {k: SAFETENSORS_NAMES.get(v.dtype, str(v.dtype)) for k, v in tensors.items()}
        return SingleFileHeader(path, "ckpt", shapes, dtypes, {}, global_step)
    raise UserError(f"{path}: unknown checkpoint file type '{path.suffix}'; valid: a diffusers "
                    f"folder, or a single file ending in {', '.join(SINGLE_FILE_SUFFIXES)}")


def editc_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The provenance keys editc writes into edited checkpoints (``editc.*``)."""
    return {k: v for k, v in sorted(metadata.items()) if k.startswith("editc.")}
