"""``editc compile RECIPE``: the whole pipeline, recipe in, edited checkpoint out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from compiler.cli import main
from compiler.cli.options import device_option
from compiler.export.formats import format_names


@main.command("compile")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--model", "model_path", default=None, help="Model to edit (path or 'toy'); overrides the recipe's model.")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Output folder (default: the recipe's outputs.dir, else out/<recipe name>); "
                   "a path ending in .safetensors with --format single-file writes that one file.")
@click.option("--format", "formats", multiple=True, type=click.Choice(format_names()),
              help="Output format(s); default: the recipe's outputs.formats.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="SD-2.x single files without metadata: 512-base (epsilon) or 768-v (v_prediction); "
                   "overrides the recipe's prediction_type.")
@click.option("--resolution", default=None, metavar="WxH",
              help="modelspec.resolution of a single-file output; overrides the recipe's outputs.resolution.")
@click.option("--verify/--no-verify", "run_verify", default=None, help="Run the recipe's verify gates after export.")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def compile_command(recipe_path, model_path, out_dir, formats, force, prediction_type, resolution, run_verify,
                    device, as_json, quiet):
    """Compile RECIPE into an edited checkpoint (diffusers folder + manifest.json).

    Locates the layers holding each concept, solves one closed-form ridge regression per
    context dimension for all edits, writes the new weights and, if asked, verifies.
    """
    from compiler.compile import compile_to_disk
    from compiler.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    started = time.perf_counter()
    manifest = compile_to_disk(recipe, model=model_path, out=out_dir, formats=formats or None, force=force,
                               verify=run_verify, progress=not quiet, prediction_type=prediction_type,
                               resolution=resolution, device=device)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    else:
        _print_summary(manifest, time.perf_counter() - started)
    if manifest.get("verify") and not manifest["verify"]["passed"]:
        from compiler.errors import GateFailed

        raise GateFailed(f"{len(manifest['verify']['failed'])} gate(s) failed: {', '.join(manifest['verify']['failed'])}")


def _print_summary(manifest: dict, seconds: float) -> None:
    echo = click.echo
    base = manifest["base_model"]
    echo(f"editc compile: {manifest['recipe']['path']} on {base['path']} ({base['family']}, {base['format']})")
    for e in manifest["edits"]:
        where = f"layers {e['layers']} ({e['layers_source']}: {e['layers_reason']})" if e["layers"] else f"text encoder layer 0 {e.get('site', '')}"
        echo(f"  {e['concept']!r} -> {e['replacement']!r} [{e['attribute']}] {e['method']} ({e['method_reason']}): "
             f"{where.rstrip()}, {e['prompt_pairs']} prompt pairs, λ={e['lambda']}, eos {'on' if e['eos'] else 'off'}")
    for s in manifest["solves"]:
        extra = f", condition number {s['condition_number']:.3g}" if "condition_number" in s else ""
        heads = f", {s['heads']} heads" if "heads" in s else ""
        echo(f"  solve {s['method']}{' at ' + s['site'] if 'site' in s else ''}: {len(s['tensors'])} tensors{heads}{extra}"
             + (f", {s['rows']} rows + {s['preserve_rows']} preservation rows" if "rows" in s else ""))
    compute = manifest.get("compute") or {}
    if compute:
        echo(f"  on {compute.get('gpu') or compute.get('device')}: embed {compute.get('embed_dtype')}, "
             f"solve {compute.get('solve_dtype')}")
    t = manifest["timings_seconds"]
    echo("  time: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()) + f" (total {seconds:.1f}s)")
    for fmt, path in manifest["outputs"].items():
        echo(f"  wrote {fmt}: {path}")
    output = manifest.get("output", {})
    if "absolute" in output.get("from", ""):
        echo(f"  note: the output folder {output['path']} comes from {output['from']}, outside the recipe's folder")
    v = manifest.get("verify")
    if v:
        echo(f"  verify: {'PASSED' if v['passed'] else 'FAILED'} ({v.get('report', '')}; base: {v.get('base', '')})")
