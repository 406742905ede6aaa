"""``editc export onnx|single-file`` and ``editc apply``: other formats of a model.

    editc export onnx MODEL --out DIR [--fp16] [--force]
    editc export single-file MODEL --out FILE.safetensors [--force]
    editc apply DELTA --to CHECKPOINT --out PATH [--force]

MODEL is 'toy', a diffusers folder (for instance one ``editc compile`` wrote) or a single file.
Every output is written atomically and never replaces an existing path without ``--force``.
"""

from __future__ import annotations

import json
import time

import click

from compiler.cli import main
from compiler.cli.options import device_option
from compiler.errors import UserError


def _echo_json(document: dict) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


@main.group("export")
def export_group() -> None:
    """Export a model as ONNX or as an original single file."""


@export_group.command("onnx")
@click.argument("model", default="toy")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (text_encoder/, unet/, vae_decoder/, vae_encoder/ ...).")
@click.option("--fp16", is_flag=True, help="Export float16 graphs (default float32).")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript",
              show_default=True, help="torch.onnx exporter; dynamo falls back to torchscript per "
              "component where it fails.")
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime parity check.")
@click.option("--tolerance", type=float, default=None,
              help="Max abs error allowed relative to max(1, max|output|) (default 1e-3 fp32, 3e-2 fp16).")
@device_option
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_onnx_command(model, out_dir, fp16, exporter, no_check, tolerance, device, force, as_json):
    """Export MODEL's text encoder(s), UNet and VAE to ONNX, checked with onnxruntime.

    Graphs are traced in float32 on the CPU; --device picks where onnxruntime runs the parity
    check (cuda: its CUDA execution provider, from onnxruntime-gpu). Exits 1 when an
    onnxruntime output differs from PyTorch by more than the tolerance (nothing is written then).
    """
    from compiler.device import resolve_device
    from compiler.export.onnx import export_onnx
    from compiler.export.onnx_pipeline import providers_for
    from compiler.export.provenance import read_provenance
    from compiler.io import claim_output, input_paths
    from compiler.models.load import load_model

    providers = providers_for(resolve_device(device))
    if resolve_device(device).type == "cuda":
        if "CUDAExecutionProvider" not in providers:
            raise UserError("--device cuda: this onnxruntime has no CUDA execution provider; "
                            "pip install 'editc[gpu]' (onnxruntime-gpu), or use --device cpu")
    started = time.perf_counter()
    # Claimed (checked, locked) before the minutes a large model takes to load.
    with claim_output(out_dir, force=force, inputs=input_paths(model), kind="dir"):
        loaded = load_model(model)
        provenance = read_provenance(loaded.source_path)
        result = export_onnx(loaded, out_dir, "fp16" if fp16 else "fp32", force=force, provenance=provenance,
                             exporter=exporter, check=not no_check, tolerance=tolerance, providers=providers)
    seconds = time.perf_counter() - started
    if as_json:
        _echo_json({"out": str(result.path), "family": result.family, "dtype": result.dtype,
                    "components": result.components, "parity": result.parity,
                    "export_seconds": result.seconds, "total_seconds": seconds})
        return
    click.echo(f"wrote ONNX ({result.dtype}, {result.family}) to {result.path} in {seconds:.1f} s")
    for name, info in result.components.items():
        line = f"  {name:<15} {info['dtype']}  {info['exporter']:<11} {result.seconds[name]:6.1f} s"
        if name in result.parity:
            check = result.parity[name]
            line += f"  max abs error {check['max_abs_error']:.2e} (tolerance {check['tolerance']:.1e})"
        click.echo(line)


@export_group.command("single-file")
@click.argument("model")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Output .safetensors file.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="SD-2.x files without metadata: 512-base (epsilon) or 768-v (v_prediction); "
                   "written to modelspec.prediction_type instead of a guess.")
@click.option("--resolution", default=None, metavar="WxH",
              help="modelspec.resolution to write (default: the source's, else the UNet's size).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_single_file_command(model, out_path, force, prediction_type, resolution, as_json):
    """Write MODEL in its family's original single-file layout (A1111/ComfyUI).

    A diffusers folder is converted (its editc provenance carried over); a single file is
    copied with its metadata and ModelSpec keys completed.
    """
    from compiler.export.provenance import read_provenance
    from compiler.export.single_file import export_single_file
    from compiler.models.load import resolve_model_path

    from compiler.io import claim_output, input_paths

    started = time.perf_counter()
    with claim_output(out_path, force=force, inputs=input_paths(model), kind="file"):
        source = resolve_model_path(model)
        provenance = read_provenance(source)
        written = export_single_file({}, source, out_path, provenance, force=force,
                                     prediction_type=prediction_type, resolution=resolution)
    seconds = time.perf_counter() - started
    if as_json:
        _echo_json({"out": str(written), "seconds": seconds, "provenance": sorted(provenance)})
    else:
        click.echo(f"wrote {written} in {seconds:.1f} s")


@main.command("apply")
@click.argument("delta", type=click.Path(dir_okay=False))
@click.option("--to", "checkpoint", required=True,
              help="The checkpoint to apply DELTA to: a diffusers folder, a single file or 'toy'.")
@click.option("--out", "out_path", required=True, type=click.Path(),
              help="Output: a folder for a diffusers checkpoint, a .safetensors file for a single file.")
@click.option("--force", is_flag=True, help="Apply even if CHECKPOINT is not the delta's base; "
              "replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def apply_command(delta, checkpoint, out_path, force, as_json):
    """Apply an editc DELTA file to CHECKPOINT, writing the edited model to --out.

    Refuses a checkpoint that is not the delta's base (another hash and other values of the
    edited tensors) unless --force; the checkpoint itself is never modified.
    """
    from compiler.export.delta import apply_delta
    from compiler.io import claim_output, input_paths

    started = time.perf_counter()
    with claim_output(out_path, force=force, inputs=input_paths(delta, checkpoint), kind="any"):
        result = apply_delta(delta, checkpoint, out_path, force=force)
    seconds = time.perf_counter() - started
    how = {"hash": "base hash matches", "tensors": "same base weights in the other layout",
           "forced": "NOT the delta's base: applied because of --force"}[result.base_match]
    if as_json:
        _echo_json({"out": str(result.out), "base_match": result.base_match, "tensors": result.tensors,
                    "seconds": seconds})
    else:
        click.echo(f"applied {result.tensors} tensors to {checkpoint} ({how}): wrote {result.out} "
                   f"in {seconds:.1f} s")
