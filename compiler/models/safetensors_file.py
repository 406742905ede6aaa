"""Safetensors files: the one header reader, ranged tensor reads, and deterministic writers.

Every module that opens a ``.safetensors`` file goes through :class:`SafetensorsFile` (or
:func:`read_safetensors_header`): the loader (``compiler.models.load``/``selective``), the
exporters (``compiler.export.single_file``/``diffusers_folder``/``delta``) and the checks.
Its header (an 8-byte length and a JSON table of names, dtypes, shapes and byte ranges) is
validated before any tensor is allocated: every field's type, known dtypes, shapes matching
byte ranges (size = dtype × shape, for every tensor), ranges inside the file, disjoint and
covering the data without holes, float weights, string metadata.

Writers (:func:`write_safetensors`, :func:`write_safetensors_streamed`,
:func:`patch_safetensors_copy`) are byte-identical for identical inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler.errors import UserError

# safetensors dtype names <-> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_COPY_CHUNK = 16 * 1024 * 1024

# Bytes per element of each safetensors dtype.
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit


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


def _read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
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
    return header, dict(metadata), 8 + header_len


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Just the ``__metadata__`` of a safetensors file."""
    return read_safetensors_header(Path(path))[1]




def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The validated tensor table (name -> dtype, shape, data_offsets) and ``__metadata__``."""
    entries, metadata, _ = _read_header(Path(path))
    return entries, metadata


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Just the ``__metadata__`` of a safetensors file."""
    return read_safetensors_header(path)[1]


def torch_dtype(safetensors_dtype: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name ("F16" -> torch.float16), None if unknown."""
    return SAFETENSORS_DTYPES.get(safetensors_dtype)


@dataclass
class SafetensorsFile:
    """One safetensors file: its validated header once, then each tensor read from its own
    byte range with a positioned read. (A memory map, as ``safe_open`` uses, would leave every
    page it touched counted in the process's resident memory until it is closed; explicit reads
    keep peak memory at the tensors actually held.)"""

    path: Path
    entries: dict[str, dict]  # in file order: name -> {dtype, shape, data_offsets}
    metadata: dict[str, str]
    data_start: int  # byte offset of the data section

    @classmethod
    def read(cls, path: str | os.PathLike) -> SafetensorsFile:
        path = Path(path)
        entries, metadata, data_start = _read_header(path)  # validated against the file size
        return cls(path, entries, metadata, data_start)

    def keys(self):
        return self.entries.keys()

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.entries[name]["dtype"]]

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if end == start:
            return torch.empty(entry["shape"], dtype=dtype)
        buffer = bytearray(end - start)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self.data_start + start)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                n = f.readinto(view[done:])
                if not n:
                    raise UserError(f"{self.path}: truncated while reading {name}")
                done += n
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    tensor = get_tensor


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _header_bytes(entries: Mapping[str, dict], metadata: Mapping[str, str]) -> bytes:
    header = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(tensors: Mapping[str, torch.Tensor], out_file: Path, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file deterministically: byte-identical for identical inputs.

    (``safetensors.torch.save_file`` keeps metadata in a hash map, whose order varies from run
    to run.) Tensors are laid out as safetensors orders them, by descending element size, then
    name, so every tensor stays aligned to its element size.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    entries, offset = {}, 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    with out_file.open("wb") as f:
        f.write(_header_bytes(entries, metadata))
        for name in order:
            f.write(_tensor_bytes(tensors[name]))


def write_safetensors_streamed(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], produce,
                               out_file: Path, metadata: Mapping[str, str]) -> None:
    """:func:`write_safetensors` one tensor at a time: the header from dtypes and shapes alone,
    then ``produce(name)`` for each tensor in the same order, written and dropped, so peak
    memory is one tensor, not the checkpoint. Byte-identical to ``write_safetensors`` of the
    same tensors."""
    def size(name: str) -> int:
        dtype, shape = entries[name]
        count = 1
        for n in shape:
            count *= int(n)
        return count * torch.empty((), dtype=dtype).element_size()

    order = sorted(entries, key=lambda n: (-torch.empty((), dtype=entries[n][0]).element_size(), n))
    table, offset = {}, 0
    for name in order:
        dtype, shape = entries[name]
        table[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": [int(n) for n in shape],
                       "data_offsets": [offset, offset + size(name)]}
        offset += size(name)
    with out_file.open("wb") as f:
        f.write(_header_bytes(table, metadata))
        for name in order:
            tensor = produce(name)
            dtype, shape = entries[name]
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise ValueError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, announced "
                                 f"{dtype} {list(shape)}")
            f.write(_tensor_bytes(tensor))


def _copy_rest(src, dst) -> None:
    """Copy ``src`` from its position to its end onto ``dst``: in the kernel where it can
    (``copy_file_range``: no bytes through user space, a reflink on filesystems that share
    blocks), else through a 16 MiB buffer."""
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        dst.flush()
        remaining = os.fstat(src.fileno()).st_size - src.tell()
        offset_in, offset_out = src.tell(), dst.tell()
        try:
            while remaining > 0:
                n = copy_range(src.fileno(), dst.fileno(), min(remaining, 1 << 30), offset_in, offset_out)
                if n == 0:
                    break
                offset_in += n
                offset_out += n
                remaining -= n
            if remaining == 0:
                src.seek(offset_in)
                dst.seek(offset_out)
                return
        except OSError:
            pass
        src.seek(offset_in)
        dst.seek(offset_out)
    shutil.copyfileobj(src, dst, _COPY_CHUNK)


def patch_safetensors_copy(source: SafetensorsFile, out_file: Path,
                           replacements: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``source`` to ``out_file`` with the tensors in ``replacements`` overwritten.

    The tensor table is kept as is (each replacement has the stored dtype and shape, hence the
    same byte range); only the header's metadata changes. ``out_file`` is written, never the
    source.
    """
    patches = []
    for name, tensor in replacements.items():
        entry = source.entries.get(name)
        if entry is None:
            raise UserError(f"{source.path}: has no tensor '{name}' to patch")
        if SAFETENSORS_DTYPES.get(entry["dtype"]) != tensor.dtype or list(tensor.shape) != list(entry["shape"]):
            raise ValueError(f"{name}: patch is {tensor.dtype} {list(tensor.shape)}, the file holds "
                             f"{entry['dtype']} {entry['shape']}")
        start, end = entry["data_offsets"]
        data = _tensor_bytes(tensor)
        if len(data) != end - start:
            raise ValueError(f"{name}: patch is {len(data)} bytes, the file's range is {end - start}")
        patches.append((start, data))
    with source.path.open("rb") as src, out_file.open("wb") as dst:
        dst.write(_header_bytes(source.entries, metadata))
        src.seek(source.data_start)
        _copy_rest(src, dst)
        data_start = dst.tell() - (source.path.stat().st_size - source.data_start)
        for start, data in sorted(patches, key=lambda p: p[0]):
            dst.seek(data_start + start)
            dst.write(data)
