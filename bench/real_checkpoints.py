"""The edit benchmark on real checkpoints (SD-1.5, SD-2.1, SD-XL), for a user with the weights
and a GPU. Nothing is downloaded: every path is given on the command line.

    python bench/real_checkpoints.py \\
        --model sd15=/models/stable-diffusion-v1-5 \\
        --model sd21=/models/stable-diffusion-2-1 \\
        --model sdxl=/models/sd_xl_base_1.0.safetensors \\
        --clip /models/clip-vit-large-patch14 \\
        [--device cuda] [--out bench/results] [--quick] [--kinds style,object] [--methods ...]

``--model NAME=PATH`` (repeatable): a diffusers folder or an original single file of SD-1.x,
SD-2.x or SD-XL (the family is detected from the weights). ``--clip``: a local transformers
``CLIPModel`` folder that judges the images (verify's CLIP-folder judge). For each model this
runs the same harness as ``editc bench`` (``compiler.bench.harness``) with the papers' settings:

- ESD-x: 1000 steps, batch 1, Adam lr 1e-5, x_t from 50-step DDIM with guidance 3;
- Concept Ablation: 400 steps, batch 8, Adam lr 1e-5, 200 anchor images (50 DDIM steps, guidance 6);
- UCE (λ 0.5, preserve scale 0.1) and TIME (λ 0.1) on all cross-attention K/V;
- editc LocoEdit and neurons (top 50) on the papers' known layers for the family, Diff-QuickFix.

and writes ``<out>/bench_<NAME>.json`` and ``.md``. The closed-form edits take seconds; the
fine-tuning runs and the verify images take most of the time (on one H100-class GPU, roughly
an hour for SD-1.5 and several for SD-XL with every method and kind; ``--kinds``,
``--methods``, ``--esd-steps`` and ``--ca-steps`` cut it down, and ``--quick`` is a smoke run).
The time ratios are measured in the same run, on the same GPU, as on the toy world.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's compiler, installed or not

from compiler.bench.baselines.concept_ablation import ConceptAblationConfig  # noqa: E402
from compiler.bench.baselines.esd import ESDConfig  # noqa: E402
from compiler.bench.harness import run_bench  # noqa: E402
from compiler.bench.report import markdown, write_report  # noqa: E402
from compiler.bench.settings import METHODS, RESULTS_DIR, TASKS, BenchSettings, parse_layers  # noqa: E402
from compiler.errors import UserError  # noqa: E402


def paper_settings() -> BenchSettings:
    """The papers' settings for full-size models (see the module docstring)."""
    return BenchSettings(
        repeats=5,
        esd=ESDConfig(steps=1000, learning_rate=1e-5, ddim_steps=50, start_guidance=3.0),
        concept_ablation=ConceptAblationConfig(steps=400, batch_size=8, learning_rate=1e-5, anchor_images=200,
                                               anchor_sampling_steps=50, anchor_guidance=6.0),
        neurons_top_k=50,  # of SD-1.5's 1280 K/V neurons (ICML 2024: 30/50/100)
        layers="default",
        verify_seeds=2, verify_prompts=8, verify_steps=25, verify_batch=8,
        scaling_counts=(1, 10, 50, 100), scaling_repeats=3,
    )


def quick_settings() -> BenchSettings:
    """A smoke run of every code path on real weights: minutes, not hours; numbers without meaning."""
    return replace(
        paper_settings(),
        repeats=2,
        esd=ESDConfig(steps=20, learning_rate=1e-5, ddim_steps=10, start_guidance=3.0),
        concept_ablation=ConceptAblationConfig(steps=20, batch_size=4, learning_rate=1e-5, anchor_images=8,
                                               anchor_sampling_steps=10, anchor_guidance=6.0),
        verify_seeds=1, verify_prompts=2, verify_steps=10, scaling_counts=(1, 10), scaling_repeats=1,
    )


def parse_models(items: list[str]) -> list[tuple[str, Path]]:
    models = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--model {item!r}: give NAME=PATH, e.g. sd15=/models/stable-diffusion-v1-5")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"--model {item!r}: NAME may hold letters, digits, '-' and '_' only (it names the output)")
        if not Path(path).exists():
            raise UserError(f"--model {item!r}: {path} does not exist")
        models.append((name.strip(), Path(path)))
    if len({name for name, _ in models}) != len(models):
        raise UserError("--model: every NAME must be different")
    return models


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="real_checkpoints.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a checkpoint to benchmark (repeatable): diffusers folder or single file")
    parser.add_argument("--clip", required=True, help="local transformers CLIPModel folder: the judge")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="where bench_<NAME>.json/.md go (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny settings, numbers without meaning")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--kinds", default=",".join(TASKS), help="comma-separated subset of style,object,fact")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of each closed-form edit")
    parser.add_argument("--esd-steps", type=int, default=None, help="ESD steps (default 1000)")
    parser.add_argument("--ca-steps", type=int, default=None, help="Concept Ablation steps (default 400)")
    parser.add_argument("--layers", default="default",
                        help="LocoEdit/neurons layers: default (the papers' table; the default), locate "
                             "(LocoGen with the judge), or a list like 8,9")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1/10/50/100-concept scaling run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    settings = quick_settings() if args.quick else paper_settings()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [m for m in methods if m not in METHODS] + [k for k in kinds if k not in TASKS]
    if bad or not methods or not kinds:
        raise UserError(f"--methods/--kinds: unknown {', '.join(bad) or 'empty list'}")
    settings = replace(settings, methods=methods, kinds=kinds, **parse_layers(args.layers))
    if args.repeats is not None:
        settings = replace(settings, repeats=max(1, args.repeats))
    if args.esd_steps is not None:
        settings = replace(settings, esd=replace(settings.esd, steps=max(1, args.esd_steps)))
    if args.ca_steps is not None:
        settings = replace(settings, concept_ablation=replace(settings.concept_ablation, steps=max(1, args.ca_steps)))
    return settings


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    models = parse_models(args.model)
    if not Path(args.clip).is_dir():
        raise UserError(f"--clip {args.clip}: not a folder; give a local transformers CLIPModel folder")
    for name, path in models:
        print(f"[bench] {name}: {path}", file=sys.stderr, flush=True)
        report = run_bench(path, settings, judge_path=args.clip, device=args.device, progress=not args.quiet,
                           scaling=not args.no_scaling)
        report["name"] = name
        stem = f"bench_{name}_quick" if args.quick else f"bench_{name}"
        json_path, md_path = write_report(report, Path(args.out), stem)
        print(f"## {name}\n\n{markdown(report)}")
        print(f"[bench] wrote {json_path} and {md_path}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"real_checkpoints.py: error: {err}", file=sys.stderr)
        sys.exit(2)
