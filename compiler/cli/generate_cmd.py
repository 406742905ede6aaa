"""``editc generate``: draw pictures from a model with fixed seeds (one image or a grid)."""

from __future__ import annotations

import click

from compiler.cli import main
from compiler.cli.options import device_option
from compiler.errors import UserError


MAX_SEEDS = 1024  # pictures in one grid; more is not for looking at
MAX_GRID_PIXELS = 256 * 10**6


def parse_seeds(text: str) -> list[int]:
    """'0' -> [0]; '0-3' -> [0, 1, 2, 3]; '1,5,9' -> [1, 5, 9]."""
    seeds: list[int] = []
    shown = text if len(text) <= 40 else text[:40] + "…"
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                if int(hi) - int(lo) >= MAX_SEEDS:
                    raise UserError(f"--seeds: {shown!r} asks for more than {MAX_SEEDS} seeds; give fewer")
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
            if len(seeds) > MAX_SEEDS:
                raise UserError(f"--seeds: {shown!r} asks for more than {MAX_SEEDS} seeds; give fewer")
    except ValueError:
        raise UserError(f"--seeds: {shown!r} is not a seed list; use e.g. 0, 0-7 or 1,5,9") from None
    if not seeds:
        raise UserError("--seeds: no seeds given")
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise UserError(f"--seeds: {str(bad[0])[:24]} is out of range; seeds are whole numbers from 0 to 2**63-1")
    return seeds


@main.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@click.option("--model", "model_path", default="toy", show_default=True, help="Model folder, single file, ONNX export folder (runs on onnxruntime), or 'toy'.")
@click.option("--seed", "--seeds", "seeds", default="0", show_default=True, help="Seed, range (0-7) or list (1,5,9).")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(1, 1000), help="DDIM steps.")
@click.option("--guidance", default=4.0, show_default=True, type=click.FloatRange(0, 100),
              help="Classifier-free guidance scale.")
@click.option("--scale", default=4, show_default=True, type=click.IntRange(1, 32),
              help="Upscale the saved picture (nearest) for viewing.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="PNG to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out picture.")
@device_option
def generate_command(prompts, model_path, seeds, steps, guidance, scale, out_path, force, device):
    """Generate images for PROMPTS; one prompt and seed gives one picture, more give a grid
    (one row per prompt, one column per seed)."""
    from PIL import Image

    from compiler.generate import generate_images, image_grid, load_generator
    from compiler.io import claim_output, input_paths

    seed_list = parse_seeds(seeds)
    if len(prompts) * len(seed_list) > MAX_SEEDS:
        raise UserError(f"{len(prompts)} prompts x {len(seed_list)} seeds is more than {MAX_SEEDS} pictures; "
                        f"give fewer prompts or seeds")
    if not out_path.lower().endswith(".png"):
        raise UserError(f"--out: {out_path!r} must end in .png")
    with claim_output(out_path, force=force, inputs=input_paths(model_path), kind="file") as claim:
        pipe = load_generator(model_path, device=device)
        pipe.set_progress_bar_config(disable=True)
        all_prompts = [p for p in prompts for _ in seed_list]
        all_seeds = [s for _ in prompts for s in seed_list]
        images = generate_images(pipe, all_prompts, all_seeds, steps=steps, guidance=guidance)
        pixels = len(images) * images[0].shape[0] * images[0].shape[1] * scale * scale
        if pixels > MAX_GRID_PIXELS:
            raise UserError(f"--scale {scale}: the grid would have {pixels / 1e6:.0f} megapixels (at most "
                            f"{MAX_GRID_PIXELS // 10**6}); use a smaller --scale or fewer prompts/seeds")
        picture = image_grid(images, cols=len(seed_list), scale=max(1, scale))
        with claim.staging() as temporary:
            Image.fromarray(picture).save(temporary, format="PNG")
    click.echo(f"wrote {out_path}: {len(prompts)} prompt(s) x {len(seed_list)} seed(s)")
