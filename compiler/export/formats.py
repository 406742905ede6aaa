"""Compile's output formats as plug-ins: one module each, registered here (one line per format).

A format module defines ``write_output(job: ExportJob) -> dict`` that writes into
``job.folder`` (compile's staging folder, renamed into place when every format is written) and
returns its entries for the manifest's ``outputs`` (format name -> path, plus any numbers).
A format that reads the model as a pipeline calls ``job.edited_pipeline()``: the base model's
pipeline with the edited tensors fused in, built on first call and shared by every format of
the job; formats that patch files never call it, and then no pipeline is built.
A format may also name a click command in its module (``command``): ``editc export <name>``.
Recipe validation, ``editc compile --format``, ``editc export`` and compile read this
registry. Modules are imported only when their format is written (ONNX pulls in onnxruntime).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
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
    timings: dict[str, float] = field(default_factory=dict)  # "fuse", when a pipeline was built
    _pipeline: object = field(default=None, repr=False)

    def edited_pipeline(self):
        """The base model's export pipeline (float32, on the CPU) holding the edit: built and
        fused on the first call only (``compiler.fuse.fuse_weights``)."""
        if self._pipeline is None:
            import time

            from compiler.fuse import fuse_weights

            started = time.perf_counter()
            pipeline = self.loaded.export_pipeline
            fuse_weights(pipeline, self.new_tensors)
            self._pipeline = pipeline
            self.timings["fuse"] = time.perf_counter() - started
        return self._pipeline

    @property
    def pipeline_built(self) -> bool:
        return self._pipeline is not None


@dataclass(frozen=True)
class ExportFormat:
    name: str
    module: str  # defines write_output(job) -> dict
    summary: str
    command: str | None = None  # a click command in the module: ``editc export <name>``

    def write(self, job: ExportJob) -> dict:
        return importlib.import_module(self.module).write_output(job)

    def cli_command(self):
        return getattr(importlib.import_module(self.module), self.command) if self.command else None


# The registry, in the order compile writes.
FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("diffusers", "compiler.export.diffusers_folder", "a diffusers folder"),
    ExportFormat("single-file", "compiler.export.single_file",
                 "the original single-file checkpoint layout (A1111/ComfyUI)", command="command"),
    ExportFormat("delta", "compiler.export.delta", "only the edited tensors"),
    ExportFormat("onnx", "compiler.export.onnx", "per-component ONNX folders", command="command"),
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
