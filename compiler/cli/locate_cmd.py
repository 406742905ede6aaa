"""``editc locate``: LocoGen, the window of cross-attention layers that holds a concept."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from compiler.cli import main
from compiler.cli.options import device_option, force_option, judge_option
from compiler.errors import UserError


def parse_seed_list(text: str) -> tuple[int, ...]:
    """'0' -> (0,); '0-3' -> (0, 1, 2, 3); '1,5,9' -> (1, 5, 9); bounded like generate's."""
    from compiler.cli.generate_cmd import parse_seeds

    return tuple(parse_seeds(text))


def load_for_sweep(model_path: str, device: str | None):
    """Load the model on this process's device (``torchrun``: one GPU per rank), in the device
    policy's generation dtype (``compiler.device``)."""
    from compiler.locate.distributed import init_from_environment
    from compiler.models.load import load_for_generation

    process_device = init_from_environment(device)  # joins torchrun's process group, if any
    loaded = load_for_generation(model_path, device=process_device)
    loaded.pipeline.set_progress_bar_config(disable=True)
    return loaded


def claim_sweep_output(out: Path, force: bool, model_path: str) -> None:
    """Before the sweep: rank 0 (the writer) claims the output for the command's lifetime
    (checked against the model, locked); other torchrun ranks write nothing and only check."""
    from compiler.io import check_output_path, claim_output, input_paths

    if int(os.environ.get("RANK", "0")) == 0:
        click.get_current_context().with_resource(
            claim_output(out, force=force, inputs=input_paths(model_path), kind="dir"))
    else:
        check_output_path(out, force=force, inputs=input_paths(model_path))


def default_out(kind: str, name: str) -> Path:
    return Path("out") / kind / name  # its folders are made when the output is claimed


@main.command("locate")
@click.option("--model", "model_path", default="toy", show_default=True,
              help="Model folder, single file, or 'toy'.")
@click.option("--concept", required=True, help="The phrase to locate, e.g. 'van gogh'.")
@click.option("--replacement", required=True,
              help="The neutral phrase layers in the window see instead, e.g. 'a painting'.")
@click.option("--attribute", type=click.Choice(["style", "object", "fact"]), required=True)
@click.option("--prompt", "prompt_list", multiple=True,
              help="A prompt containing the concept (repeatable); default: the papers' templates.")
@click.option("--prompts", "n_prompts", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="How many template prompts to sweep (without --prompt).")
@click.option("--seeds", default="0", show_default=True, help="Seed, range (0-3) or list (1,5,9).")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True, help="DDIM steps of the sweep.")
@click.option("--guidance", default=4.0, show_default=True, type=click.FloatRange(0, 100), help="Classifier-free guidance scale.")
@click.option("--resolution", type=click.IntRange(8, 4096), default=None,
              help="Image side in pixels for the sweep (default: the model's).")
@click.option("--max-m", "max_m", type=click.IntRange(1, 128), default=3, show_default=True, help="Largest window size to try.")
@click.option("--threshold", default=0.8, show_default=True,
              help="A window passes when its effect (0: clean, 1: as if the prompt were replaced "
                   "in every layer) reaches this.")
@click.option("--criterion", type=click.Choice(["auto", "accuracy", "clip"]), default="auto",
              show_default=True, help="What decides: the judge's zero-shot rate, or CLIP-score.")
@click.option("--full-sweep", is_flag=True,
              help="Sweep every m up to --max-m (a complete heat map), not only until one passes.")
@click.option("--confirm-steps", type=click.IntRange(1, 1000), default=None,
              help="Measure the winner again with this many steps at the model's resolution.")
@click.option("--batch", type=click.IntRange(1, 4096), default=None,
              help="Samples per pipeline call [default: 32 on the CPU; on a GPU sized to its free memory].")
@judge_option()
@device_option
@click.option("--out", "out_dir", default=None,
              help="Folder for locate.json, heatmap.png, grid.png [default: out/locate/CONCEPT.ATTRIBUTE].")
@force_option("an existing --out folder")
@click.option("--no-cache", is_flag=True, help="Sweep again even when a cached result exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def locate_command(model_path, concept, replacement, attribute, prompt_list, n_prompts, seeds, steps,
                   guidance, resolution, max_m, threshold, criterion, full_sweep, confirm_steps, batch,
                   judge_dir, device, out_dir, force, no_cache, as_json):
    """Find the cross-attention layers that hold CONCEPT (LocoGen): every window of m adjacent
    layers is fed the prompt with REPLACEMENT instead, and the smallest m whose best window
    removes the concept (or, for a fact, brings in the replacement) wins."""
    from compiler.io import atomic_output_dir
    from compiler.locate import LocateSettings, locate, write_outputs
    from compiler.locate.cache import slug
    from compiler.locate.distributed import current_process_group
    from compiler.locate.scoring import load_judge_for

    out = Path(out_dir) if out_dir else default_out("locate", f"{slug(concept)}.{attribute}")
    claim_sweep_output(out, force, model_path)  # fail before the sweep, not after
    seed_list = parse_seed_list(seeds)
    loaded = load_for_sweep(model_path, device)
    judge = load_judge_for(loaded.source_path, judge_dir, device=loaded.policy.device)
    settings = LocateSettings(prompts=tuple(prompt_list), n_prompts=n_prompts, seeds=tuple(seed_list),
                              steps=steps, guidance=guidance, height=resolution, width=resolution,
                              max_m=max_m, threshold=threshold, criterion=criterion, full_sweep=full_sweep,
                              confirm_steps=confirm_steps, batch=batch or loaded.policy.generation_batch(32))
    result = locate(loaded.pipeline, concept, replacement, attribute, settings, judge=judge,
                    model_hash=loaded.model_hash, use_cache=not no_cache)
    if not current_process_group().is_main:
        return
    with atomic_output_dir(out, force=force) as folder:
        write_outputs(result, folder)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "out": str(out)}, indent=2))
        return
    click.echo(result.summary())
    click.echo(f"  layers: {', '.join(result.best_layer_names)}")
    timing = "cached" if result.cached else f"{result.timings['total_s']:.1f} s, {result.timings['samples']} samples"
    click.echo(f"  wrote {out}/locate.json, heatmap.png, grid.png ({timing})")
