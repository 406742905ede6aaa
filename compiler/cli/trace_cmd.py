"""``editc trace``: causal tracing of the text encoder and the UNet for one prompt's subject."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from compiler.cli import main
from compiler.cli.options import device_option, force_option, judge_option
from compiler.cli.locate_cmd import default_out, load_for_sweep, parse_seed_list
from compiler.errors import UserError


@main.command("trace")
@click.option("--model", "model_path", default="toy", show_default=True,
              help="Model folder, single file, or 'toy'.")
@click.option("--prompt", required=True, help="The prompt, e.g. 'a house in the style of van gogh'.")
@click.option("--subject", required=True, help="The words of the prompt to corrupt, e.g. 'van gogh'.")
@click.option("--seeds", default="0-3", show_default=True, help="Seed, range (0-3) or list (1,5,9).")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True, help="DDIM steps.")
@click.option("--guidance", default=4.0, show_default=True, type=click.FloatRange(0, 100), help="Classifier-free guidance scale.")
@click.option("--resolution", type=click.IntRange(8, 4096), default=None,
              help="Image side in pixels (default: the model's).")
@click.option("--noise-scale", default=3.0, show_default=True,
              help="Noise std on the subject's token embeddings, in units of their empirical std.")
@click.option("--noise-samples", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Independent corruptions, each restored at every state.")
@click.option("--components", default="layer,attn,mlp", show_default=True,
              help="Text-encoder outputs to restore: layer (residual stream), attn, mlp.")
@click.option("--unet", "unet_granularity", type=click.Choice(["blocks", "attentions"]), default="blocks",
              show_default=True, help="Restore whole down/mid/up blocks, or every attention block.")
@click.option("--only", type=click.Choice(["text", "unet"]), default=None, help="Trace only one model.")
@click.option("--batch", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Samples per pipeline call.")
@judge_option()
@device_option
@click.option("--out", "out_dir", default=None,
              help="Folder for trace.json, text_encoder.png, unet.png [default: out/trace/SUBJECT].")
@force_option("an existing --out folder")
@click.option("--no-cache", is_flag=True, help="Trace again even when a cached result exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def trace_command(model_path, prompt, subject, seeds, steps, guidance, resolution, noise_scale, noise_samples,
                  components, unet_granularity, only, batch, judge_dir, device, out_dir, force, no_cache, as_json):
    """Causal tracing: which states of the text encoder and UNet carry SUBJECT in PROMPT.

    Corrupts SUBJECT's token embeddings, restores one clean state at a time (text encoder:
    every layer x token; UNet: every block) and measures how much of the subject comes back in
    the images (Basu et al. 2023)."""
    from compiler.cli.locate_cmd import claim_sweep_output
    from compiler.io import atomic_output_dir
    from compiler.locate.cache import slug
    from compiler.locate.distributed import current_process_group
    from compiler.locate.scoring import load_judge_for
    from compiler.locate.trace import TEXT_COMPONENTS, trace_text_encoder, trace_unet, write_trace_outputs

    out = Path(out_dir) if out_dir else default_out("trace", slug(subject))
    claim_sweep_output(out, force, model_path)
    seed_list = parse_seed_list(seeds)
    component_list = tuple(c.strip() for c in components.split(",") if c.strip())
    bad = [c for c in component_list if c not in TEXT_COMPONENTS]
    if bad or not component_list:
        raise UserError(f"--components: {', '.join(bad) or 'none given'} not among {', '.join(TEXT_COMPONENTS)}")
    if subject.lower() not in prompt.lower():
        raise UserError(f"--subject {subject!r} does not occur in --prompt {prompt!r}")
    loaded = load_for_sweep(model_path, device)
    judge = load_judge_for(loaded.source_path, judge_dir, device=loaded.policy.device)
    common = dict(judge=judge, seeds=seed_list, steps=steps, guidance=guidance, height=resolution,
                  width=resolution, noise_scale=noise_scale, noise_samples=noise_samples, batch=batch,
                  model_hash=loaded.model_hash, use_cache=not no_cache)
    text = unet = None
    if only != "unet":
        text = trace_text_encoder(loaded.pipeline, prompt, subject, components=component_list, **common)
    if only != "text":
        unet = trace_unet(loaded.pipeline, prompt, subject, granularity=unet_granularity, **common)
    if not current_process_group().is_main:
        return
    with atomic_output_dir(out, force=force) as folder:
        written = write_trace_outputs(text, unet, folder)
    if as_json:
        click.echo(json.dumps({"text_encoder": text.to_dict() if text else None,
                               "unet": unet.to_dict() if unet else None, "out": str(out)}, indent=2))
        return
    if text is not None:
        click.echo(f"text encoder: clean {text.recovery_by} {_fmt(text.clean, text.recovery_by)}, corrupted "
                   f"{_fmt(text.corrupted, text.recovery_by)}")
        for by in dict.fromkeys((text.recovery_by, "clip")):
            component, layer, token, value = text.strongest(by)
            where = (f"{component} of layer {layer} at token {token} ({text.tokens[token]!r}), recovery {value:.2f}"
                     if math.isfinite(value) else "no recovery measurable")
            click.echo(f"  strongest state by {by}: {where}")
    if unet is not None:
        click.echo(f"unet: clean {unet.recovery_by} {_fmt(unet.clean, unet.recovery_by)}, corrupted "
                   f"{_fmt(unet.corrupted, unet.recovery_by)}")
        for by in dict.fromkeys((unet.recovery_by, "clip")):
            name, value = unet.strongest(by)
            where = f"{name}, recovery {value:.2f}" if math.isfinite(value) else "no recovery measurable"
            click.echo(f"  strongest block by {by}: {where}")
    for name, result in (("text encoder", text), ("unet", unet)):
        for note in result.notes if result else ():
            click.echo(f"  note ({name}): {note}")
    click.echo(f"  wrote {out}/" + ", ".join(p.name for p in written))


def _fmt(measure, by: str) -> str:
    value = measure.rate if by == "rate" else measure.clip
    return "n/a" if value is None else f"{value:.2f}"
