"""Compile's output formats as plug-ins: one module each, registered here (one line per format).

A format module defines ``write_output(job: ExportJob) -> dict`` that writes into
``job.folder`` (compile's staging folder, renamed into place when every format is written) and
returns its entries for the manifest's ``outputs`` (format name -> path, plus any numbers).
Recipe validation, ``editc compile --format`` and compile read this registry. Modules are
imported only when their format is written (ONNX pulls in onnxruntime).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportJob:
    """What a format writes: the loaded base model (``compiler.models.load.LoadedModel``, its
    pipeline already holding the edit), the edited tensors by qualified name, the staging folder,
    the final output path, the provenance strings every file carries, and the ModelSpec
    resolution (``WxH``) a single file should record (``None``: derived)."""

    loaded: object
    new_tensors: dict
    folder: Path
    out: Path
    provenance: dict[str, str]
    resolution: str | None = None


@dataclass(frozen=True)
class ExportFormat:
    name: str
    module: str  # defines write_output(job) -> dict
    summary: str

    def write(self, job: ExportJob) -> dict:
        return importlib.import_module(self.module).write_output(job)


# The registry, in the order compile writes.
FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("diffusers", "compiler.export.diffusers_folder", "a diffusers folder"),
    ExportFormat("single-file", "compiler.export.single_file",
                 "the original single-file checkpoint layout (A1111/ComfyUI)"),
    ExportFormat("delta", "compiler.export.delta", "only the edited tensors"),
    ExportFormat("onnx", "compiler.export.onnx", "per-component ONNX folders"),
)}


def format_names() -> tuple[str, ...]:
    return tuple(FORMATS)


def write_formats(names, job: ExportJob) -> dict:
    """Write each named format (in registry order); the manifest's ``outputs``."""
    outputs: dict = {}
    for name, fmt in FORMATS.items():
        if name in names:
            outputs.update(fmt.write(job))
    return outputs
