"""``editc generate``: draw pictures from a model with fixed seeds (one image or a grid)."""

from __future__ import annotations

import click

from compiler.cli import main
from compiler.errors import UserError


def parse_seeds(text: str) -> list[int]:
    """'0' -> [0]; '0-3' -> [0, 1, 2, 3]; '1,5,9' -> [1, 5, 9]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise UserError(f"--seeds: {text!r} is not a seed list; use e.g. 0, 0-7 or 1,5,9") from None
    if not seeds:
        raise UserError("--seeds: no seeds given")
    return seeds


@main.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@click.option("--model", "model_path", default="toy", show_default=True, help="Model folder, single file, ONNX export folder (runs on onnxruntime), or 'toy'.")
@click.option("--seed", "--seeds", "seeds", default="0", show_default=True, help="Seed, range (0-7) or list (1,5,9).")
@click.option("--steps", default=25, show_default=True, help="DDIM steps.")
@click.option("--guidance", default=4.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--scale", default=4, show_default=True, help="Upscale the saved picture (nearest) for viewing.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="PNG to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out picture.")
def generate_command(prompts, model_path, seeds, steps, guidance, scale, out_path, force):
    """Generate images for PROMPTS; one prompt and seed gives one picture, more give a grid
    (one row per prompt, one column per seed)."""
    from PIL import Image

    from compiler.generate import generate_images, image_grid, load_generator
    from compiler.io import claim_output, input_paths

    seed_list = parse_seeds(seeds)
    if not out_path.lower().endswith(".png"):
        raise UserError(f"--out: {out_path!r} must end in .png")
    with claim_output(out_path, force=force, inputs=input_paths(model_path), kind="file") as claim:
        pipe = load_generator(model_path)
        pipe.set_progress_bar_config(disable=True)
        all_prompts = [p for p in prompts for _ in seed_list]
        all_seeds = [s for _ in prompts for s in seed_list]
        images = generate_images(pipe, all_prompts, all_seeds, steps=steps, guidance=guidance)
        picture = image_grid(images, cols=len(seed_list), scale=max(1, scale))
        with claim.staging() as temporary:
            Image.fromarray(picture).save(temporary, format="PNG")
    click.echo(f"wrote {out_path}: {len(prompts)} prompt(s) x {len(seed_list)} seed(s)")
