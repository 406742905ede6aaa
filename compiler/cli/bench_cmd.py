"""``editc bench``: edit time and quality against ESD, Concept Ablation, UCE and TIME.

The harness and the baselines are in the package (:mod:`compiler.bench`), so the command works
from an installed wheel. These are the benchmark's only options: ``python -m
compiler.bench.harness`` and ``bench/run_bench.py`` run this command.
"""

from __future__ import annotations

import click

from compiler.cli import main
from compiler.cli.options import device_option, judge_option


def _methods_help() -> str:
    from compiler.methods import REGISTRY

    variants = [label for method in REGISTRY.values() for label in method.bench_variants()]
    return ("Comma-separated subset of esd-x, concept-ablation, uce, time and editc's "
            f"{', '.join(variants)}.")


@main.command("bench")
@click.option("--quick", is_flag=True, help="Smoke run: every code path with tiny settings (numbers without meaning).")
@click.option("--model", default=None, type=click.Path(file_okay=False),
              help="A toy-world diffusers folder (default: the embedded toy model).")
@judge_option("judge")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Where bench_toy.json and bench_toy.md go (default: bench/results).")
@click.option("--methods", default=None, help=_methods_help())
@click.option("--kinds", default=None, help="Comma-separated subset of style, object, fact.")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed repeats of each closed-form edit.")
@click.option("--esd-steps", type=click.IntRange(min=1), default=None, help="ESD fine-tuning steps.")
@click.option("--ca-steps", type=click.IntRange(min=1), default=None, help="Concept Ablation fine-tuning steps.")
@click.option("--layers", default=None,
              help="LocoEdit/neurons layers: locate (LocoGen, cached; default), default (the papers' table) "
                   "or a list like 2,3,4.")
@click.option("--no-scaling", is_flag=True, help="Skip the 1/10/50/100-concept scaling run.")
@click.option("--only-scaling", is_flag=True,
              help="Only the scaling run (no method timing or quality); writes scaling_toy_<weighting>_<methods>.*")
@click.option("--scaling-counts", default=None, help="Comma-separated recipe sizes (default 1,10,50,100).")
@click.option("--scaling-repeats", type=click.IntRange(min=1), default=None, help="Timed compiles per size.")
@click.option("--scaling-weighting", type=click.Choice(["concept", "row"]), default=None,
              help="concept: per-concept row weights (compile's; default); row: every row equal (before).")
@click.option("--scaling-methods", default=None,
              help="auto: facts by Diff-QuickFix at v_proj, as method: auto picks (default); "
                   "locoedit: every edit LocoEdit.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench_command(quick, model, judge, out, no_scaling, only_scaling, device, quiet, **options):
    """Benchmark editc's edits against fine-tuning (ESD-x, Concept Ablation) and closed-form
    peers (UCE, TIME) on the toy world: edit time (median of interleaved repeats), efficacy,
    generalization and specificity (by editc verify), and scaling to 100 concepts in one recipe.

    Writes bench/results/bench_toy.json and bench_toy.md and prints the Markdown tables. The
    default settings take about 15 minutes on 2 CPU cores (LocoGen not yet cached); --quick
    takes a few minutes.
    """
    # Imported on use: the harness pulls in torch and the baselines.
    from compiler.bench.harness import bench_toy
    from compiler.bench.settings import settings_from_options

    settings = settings_from_options(quick=quick, **options)
    bench_toy(model, settings, quick=quick, out=out, judge_path=judge, device=device, progress=not quiet,
              scaling=not no_scaling, only_scaling=only_scaling)
