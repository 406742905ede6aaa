"""``editc inspect MODEL``: what a checkpoint is and which tensors editing would touch.

Reads headers and configs only (the components are built on the meta device to list their
layers), so it takes seconds even on full-size SD-XL; ``--load`` also builds the diffusers
pipeline to prove the weights load. The hash of a multi-GB file is computed once and cached.
"""

from __future__ import annotations

import json

import click

from compiler.cli import main
from compiler.models.families import FAMILIES


def _table(rows: list[list[str]], header: list[str], right_aligned: int = 0) -> list[str]:
    """Aligned columns; the first ``right_aligned`` columns (numbers) align right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i < right_aligned else '<'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def _known_locations(family: str) -> dict[str, list[int]]:
    return {attr: w.layers for attr, w in FAMILIES[family].known_locations.items()}


# ---- provenance hook --------------------------------------------------------------------------
# Checkpoints that editc writes carry provenance in their safetensors ``__metadata__`` under
# ``editc.*`` keys (recipe hash, base-model hash, edited tensors, λ, solve time, tool version).
# Whatever such keys a checkpoint holds are shown here as they are; the export stage decides
# what it writes.


def provenance_lines(provenance: dict[str, str]) -> list[str]:
    if not provenance:
        return ["Provenance: none (no editc.* metadata: not a checkpoint written by editc)"]
    lines = [f"Provenance ({len(provenance)} editc.* metadata keys):"]
    width = max(len(k) for k in provenance)
    for key, value in provenance.items():
        value = value if len(value) <= 200 else value[:197] + "..."
        lines.append(f"  {key:<{width}}  {value}")
    return lines


# -----------------------------------------------------------------------------------------------


def inspect_report(model: str, load: bool = False, prediction_type: str | None = None) -> dict:
    """Everything ``editc inspect`` shows, as a JSON-ready dict."""
    from compiler.models.load import inspect_source, load_model, source_hash
    from compiler.models.load import build_registry

    source = inspect_source(model, prediction_type)
    if load:
        registry = load_model(model, prediction_type=prediction_type).registry
    else:
        registry = build_registry(source)
    family = FAMILIES[source.family]
    return {
        "path": str(source.path),
        "format": source.format,
        "family": source.family,
        "family_title": family.title,
        "evidence": source.detection.evidence,
        "model_hash": source_hash(source),
        "stored_dtype": str(source.stored_dtype).removeprefix("torch.") if source.stored_dtype else None,
        "prediction_type": source.prediction_type,
        "prediction_type_guessed": source.prediction_type_guessed,
        "text_widths": list(source.detection.text_widths),
        "matches_reference_widths": registry.matches_reference_widths,
        "expected_cross_attention_layers": family.cross_attention_layers,
        "known_locations": _known_locations(source.family),
        "loaded": load,
        **{k: v for k, v in registry.to_dict().items() if k != "family"},
        "provenance": source.editc_metadata,
    }


def onnx_report(folder: str) -> dict:
    """What ``editc inspect`` shows for an ``export_onnx`` folder: read with onnx and
    onnxruntime's metadata only (no graph is run)."""
    from pathlib import Path

    import onnx

    from compiler.export.onnx_pipeline import OnnxTextToImage

    runner = OnnxTextToImage(folder, providers=("CPUExecutionProvider",))
    description = runner.description
    index = json.loads((Path(folder) / "model_index.json").read_text())
    graphs = {}
    for name, info in description["components"].items():
        model = onnx.load(str(Path(folder) / info["file"]), load_external_data=False)
        graphs[name] = {
            "dtype": info["dtype"], "exporter": info["exporter"], "external_data": info["external_data"],
            "inputs": {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()
                       for i in model.graph.input},
            "outputs": [o.name for o in model.graph.output],
            "max_abs_error": (description.get("parity") or {}).get(name, {}).get("max_abs_error"),
        }
    return {
        "path": str(folder), "format": "onnx", "family": description["family"],
        "family_title": FAMILIES[description["family"]].title,
        "format_version": description.get("format_version"), "pipeline_class": index.get("_class_name"),
        "model_hash": runner.content_hash(), "dtype": description["dtype"], "opset": description["opset"],
        "providers": list(runner.providers), "base_model_sha256": description.get("base_model_sha256"),
        "components": graphs, "provenance": description.get("provenance") or {},
    }


def format_onnx_report(report: dict) -> str:
    lines = [
        f"model       {report['path']}",
        f"format      onnx (editc format {report['format_version']}, opset {report['opset']}, "
        f"{report['dtype']}; model_index _class_name {report['pipeline_class']})",
        f"family      {report['family']}: {report['family_title']}",
        f"hash        sha256:{report['model_hash']} (all files)",
        f"base model  sha256:{report['base_model_sha256'] or 'unknown'}",
        f"runs on     onnxruntime: {', '.join(report['providers'])}",
        "",
    ]
    rows = []
    for name, graph in report["components"].items():
        error = graph["max_abs_error"]
        rows.append([name, graph["dtype"], ", ".join(f"{k}:{v}" for k, v in graph["inputs"].items()),
                     str(len(graph["outputs"])), "-" if error is None else f"{error:.2g}"])
    lines += _table(rows, ["graph", "dtype", "inputs", "outputs", "parity (max abs error)"])
    lines.append("")
    lines += provenance_lines(report["provenance"])
    return "\n".join(lines)


def format_report(report: dict) -> str:
    lines = [
        f"model       {report['path']}",
        f"format      {report['format']}",
        f"family      {report['family']}: {report['family_title']}",
        f"evidence    {report['evidence']}",
        f"hash        sha256:{report['model_hash']}",
        f"dtype       {report['stored_dtype'] or 'unknown'} (as stored)",
        f"prediction  {report['prediction_type']}" + (" (guessed: the file does not record it; "
                                                       "--prediction-type sets it)"
                                                       if report.get("prediction_type_guessed") else ""),
    ]
    if report["loaded"]:
        lines.append("loaded      yes: the diffusers pipeline builds from these weights")

    layers = report["cross_attention"]
    expected = report["expected_cross_attention_layers"]
    lines += ["", f"Cross-attention layers: {len(layers)}"
              + (f" (expected for {report['family']}: {expected})" if expected else "")
              + "; index = position in the sorted list of module names (the papers' numbering)"]
    rows = []
    for layer in layers:
        for which, name, original in (("K", layer["to_k"], layer["original_to_k"]),
                                      ("V", layer["to_v"], layer["original_to_v"])):
            first = which == "K"
            rows.append([str(layer["index"]) if first else "", str(layer["context_dim"]) if first else "",
                         layer["module_name"] if first else "", which, name, original or "-"])
    lines += _table(rows, ["idx", "ctx", "module (unet)", "", "weight in diffusers unet/",
                           "weight in single file"], right_aligned=2)

    lines += ["", "Text encoder layer-0 self-attention output projection (Diff-QuickFix W_out):"]
    rows = []
    for t in report["text_layer0"]:
        rows.append([t["component"], str(t["width"]), t["module_name"], t["weight"],
                     t["original_weight"] or "-"])
        if t["bias"]:
            rows.append(["", "", "", t["bias"], t["original_bias"] or "-"])
    lines += _table(rows, ["component", "width", "module", "tensor in diffusers", "tensor in single file"])

    known = report["known_locations"]
    lines.append("")
    if not known:
        lines.append("Known locations: none for this family (LocoGen locates per prompt)")
    else:
        spans = ", ".join(f"{attr} {ls[0]}-{ls[-1]}" for attr, ls in known.items())
        if report["matches_reference_widths"]:
            lines.append(f"Known locations (LocoGen, ICML 2024): {spans}")
        else:
            lines.append(f"Known locations (LocoGen, ICML 2024, full-size {report['family']}): {spans}"
                         f" — not applicable here, the widths differ; use `editc locate`")
    for note in report["notes"]:
        lines.append(f"note: {note}")

    lines.append("")
    lines += provenance_lines(report["provenance"])
    return "\n".join(lines)


@main.command("inspect")
@click.argument("model", default="toy")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--load", is_flag=True,
              help="Also build the diffusers pipeline from the weights (slow for full-size models).")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="SD-2.x single files only: 512-base (epsilon) or 768-v (v_prediction).")
def inspect_command(model: str, as_json: bool, load: bool, prediction_type: str | None) -> None:
    """Show MODEL's family, format, hash and layer registry.

    MODEL is 'toy' (the default), a diffusers folder, an original single-file checkpoint
    (.safetensors/.ckpt), or an ONNX folder from `editc export onnx` (its graphs, dtypes,
    parity and provenance). The registry lists every UNet cross-attention layer with the papers'
    index and its K/V weight names in both checkpoint layouts, and each text encoder's layer-0
    self-attention output projection.
    """
    from compiler.export.onnx_pipeline import is_onnx_folder

    if is_onnx_folder(model):
        report = onnx_report(model)
        click.echo(json.dumps(report, indent=2) if as_json else format_onnx_report(report))
        return
    report = inspect_report(model, load=load, prediction_type=prediction_type)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
