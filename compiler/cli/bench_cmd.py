"""``editc bench``: edit time and quality against ESD, Concept Ablation, UCE and TIME.

The harness and the baselines are in the package (:mod:`compiler.bench`), so the command works
from an installed wheel; this command forwards its options to the harness's ``main``.
"""

from __future__ import annotations

import click

from compiler.cli import main
from compiler.cli.options import device_option, judge_option


def load_harness():
    """The benchmark harness module (imported on use: it pulls in the baselines)."""
    from compiler.bench import harness

    return harness


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
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench_command(quick, model, judge, out, methods, kinds, repeats, esd_steps, ca_steps, layers, no_scaling,
                  device, quiet):
    """Benchmark editc's edits against fine-tuning (ESD-x, Concept Ablation) and closed-form
    peers (UCE, TIME) on the toy world: edit time (median of interleaved repeats), efficacy,
    generalization and specificity (by editc verify), and scaling to 100 concepts in one recipe.

    Writes bench/results/bench_toy.json and bench_toy.md and prints the Markdown tables. The
    default settings take about 15 minutes on 2 CPU cores (LocoGen not yet cached); --quick
    takes a few minutes.
    """
    argv = []
    for flag, value in (("--model", model), ("--judge", judge), ("--out", out), ("--methods", methods),
                        ("--kinds", kinds), ("--repeats", repeats), ("--esd-steps", esd_steps),
                        ("--ca-steps", ca_steps), ("--layers", layers), ("--device", device)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--quick", quick), ("--no-scaling", no_scaling),
                     ("--quiet", quiet)):
        if on:
            argv.append(flag)
    code = load_harness().main(argv)
    if code:
        raise SystemExit(code)
