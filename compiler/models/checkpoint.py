"""Reading single-file checkpoints safely: names, shapes and metadata, with clear errors.

Nothing here reads tensor data from a ``.safetensors`` file: its header (an 8-byte length and a
JSON table of names, dtypes, shapes and byte ranges) says everything detection needs, and
checking the byte ranges against the file size catches truncated downloads before any loader
trips over them. ``.ckpt`` files are read with ``torch.load(weights_only=True)`` (memory-mapped
when they are zip archives), which refuses pickled code.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler.errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + CKPT_SUFFIXES

# Bytes per element of each safetensors dtype.
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit


@dataclass
class SingleFileHeader:
    path: Path
    format: str  # "safetensors" | "ckpt"
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)
    global_step: int | None = None  # .ckpt training step, when stored (SD-2 512-base: 875000)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table and ``__metadata__`` of a safetensors file, validated against its size."""
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); expected a safetensors checkpoint")
    if size < 8:
        raise UserError(f"{path}: only {size} bytes — too short to be a safetensors file")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            raise UserError(f"{path}: not a safetensors file (its first 8 bytes announce a "
                            f"{header_len}-byte header in a {size}-byte file); it may be "
                            f"truncated, or a .ckpt/pickle file with the wrong extension")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: not a safetensors file — its header is not valid JSON "
                        f"({err.__class__.__name__}); the file is corrupt or in another "
                        f"format") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    needed = 0
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            shape = info["shape"]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header (entry '{name}' lacks dtype, "
                            f"shape or data_offsets)") from None
        elements = 1
        for n in shape:
            elements *= n
        if dtype in _DTYPE_SIZES and end - start != elements * _DTYPE_SIZES[dtype]:
            raise UserError(f"{path}: corrupt safetensors header (tensor '{name}' of shape "
                            f"{shape} {dtype} spans {end - start} bytes)")
        needed = max(needed, end)
    if needed > data_size:
        raise UserError(f"{path}: truncated — the tensors need {needed} bytes of data but the "
                        f"file holds {data_size}; download or copy it again")
    return header, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Just the ``__metadata__`` of a safetensors file."""
    return read_safetensors_header(Path(path))[1]


def load_ckpt_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The tensors of a ``.ckpt`` file (unwrapping ``state_dict``) and its ``global_step``."""
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); expected a .ckpt checkpoint")
    is_zip = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UserError(f"{path}: the checkpoint holds pickled Python objects that a safe "
                            f"load (torch.load weights_only=True) refuses; convert it to "
                            f".safetensors with a tool you trust") from None
        raise UserError(f"{path}: not a readable .ckpt checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(f"{path}: truncated or corrupt .ckpt checkpoint ({first})") from None
    global_step = None
    while isinstance(obj, dict) and "state_dict" in obj:
        if isinstance(obj.get("global_step"), int):
            global_step = obj["global_step"]
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: the .ckpt holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors, global_step


_TORCH_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}
_SAFETENSORS_DTYPES = {name: dtype for dtype, name in _TORCH_DTYPE_NAMES.items()}


def torch_dtype(safetensors_dtype: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name ("F16" -> torch.float16), None if unusual."""
    return _SAFETENSORS_DTYPES.get(safetensors_dtype)


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
        dtypes = {k: _TORCH_DTYPE_NAMES.get(v.dtype, str(v.dtype)) for k, v in tensors.items()}
        return SingleFileHeader(path, "ckpt", shapes, dtypes, {}, global_step)
    raise UserError(f"{path}: unknown checkpoint file type '{path.suffix}'; valid: a diffusers "
                    f"folder, or a single file ending in {', '.join(SINGLE_FILE_SUFFIXES)}")


def editc_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The provenance keys editc writes into edited checkpoints (``editc.*``)."""
    return {k: v for k, v in sorted(metadata.items()) if k.startswith("editc.")}
