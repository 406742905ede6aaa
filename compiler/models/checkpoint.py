"""Reading single-file checkpoints safely: names, shapes and metadata, with clear errors.

Nothing here reads tensor data from a ``.safetensors`` file: its header (an 8-byte length and a
JSON table of names, dtypes, shapes and byte ranges) says everything detection needs, and
checking the byte ranges against the file size catches truncated downloads before any loader
trips over them; every header field is validated (types, dtypes, shapes against byte ranges,
ranges inside the file) before any tensor is allocated. ``.ckpt`` files are read with
``torch.load(weights_only=True, mmap=True)`` (zip format only), which refuses pickled code.
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


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_PARAMETER_SUFFIXES = (".weight", ".bias")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(path: Path, name: str, info, data_size: int) -> tuple[int, int]:
    """One tensor entry of a safetensors header: types, a known dtype, shape and byte range
    consistent with each other and inside the file; float dtypes for weights and biases."""
    def corrupt(what: str) -> UserError:
        return UserError(f"{path}: corrupt safetensors header (tensor {name[:80]!r}: {what}); the file is "
                         f"damaged or not a safetensors checkpoint")

    if not isinstance(info, dict):
        raise corrupt(f"its entry is a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype is None or shape is None or offsets is None:
        raise corrupt("lacks dtype, shape or data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise corrupt(f"unknown dtype {str(dtype)[:20]!r}; valid: {', '.join(_DTYPE_SIZES)}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(_is_int(n) and n >= 0 for n in shape):
        raise corrupt("shape is not a list of at most 16 whole numbers >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(n) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise corrupt("data_offsets is not [start, end] with 0 <= start <= end")
    start, end = offsets
    elements = 1
    for n in shape:
        elements *= n
    if end - start != elements * _DTYPE_SIZES[dtype]:
        raise corrupt(f"shape {shape} {dtype} needs {elements * _DTYPE_SIZES[dtype]} bytes, its range spans {end - start}")
    if end > data_size:
        raise UserError(f"{path}: truncated — tensor {name[:80]!r} ends at byte {end} of the data but the "
                        f"file holds {data_size}; download or copy it again")
    if name.endswith(_PARAMETER_SUFFIXES) and dtype not in _FLOAT_DTYPES:
        raise UserError(f"{path}: tensor {name[:80]!r} is {dtype}; editc reads float checkpoints only "
                        f"({', '.join(_FLOAT_DTYPES)}), not quantized or integer weights")
    return start, end


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table and ``__metadata__`` of a safetensors file, validated before any tensor
    is read: every field's type, known dtypes, shapes matching byte ranges, ranges inside the
    file, not overlapping and covering the data without holes, float weights, string metadata."""
    path = Path(path)
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
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"{path}: not a safetensors file — its header is not valid JSON "
                        f"({err.__class__.__name__}); the file is corrupt or in another "
                        f"format") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings, "
                        f"it is a {type(metadata).__name__}{'' if not isinstance(metadata, dict) else ' with non-string values'})")
    data_size = size - 8 - header_len
    ranges = sorted(_check_entry(path, name, info, data_size) + (name,) for name, info in header.items())
    for (_, previous_end, previous), (start, _, name) in zip(ranges, ranges[1:]):
        if start < previous_end:
            raise UserError(f"{path}: corrupt safetensors header (tensors {previous[:60]!r} and {name[:60]!r} "
                            f"overlap); the file is damaged")
    # The safetensors format indexes every data byte (no holes, nothing after the last tensor):
    # the libraries that load the file refuse it otherwise, so refuse it here in one line.
    covered = 0
    for start, end, name in ranges:
        if start != covered:
            break
        covered = end
    if covered != data_size:
        raise UserError(f"{path}: corrupt safetensors header (data bytes {covered}..{data_size} belong to no "
                        f"tensor; the format allows no holes); the file is damaged or was not written by a "
                        f"safetensors library")
    return header, dict(metadata)


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Just the ``__metadata__`` of a safetensors file."""
    return read_safetensors_header(Path(path))[1]


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
