"""``editc verify RECIPE --edited DIR``: the release gate (exit 0 pass, 1 a gate failed, 2 bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compiler.cli import main
from compiler.cli.options import device_option, force_option, judge_option
from compiler.errors import GateFailed


@main.command("verify")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--edited", "edited", required=True, type=click.Path(),
              help="The edited model: the folder `editc compile` wrote (or any diffusers folder / single file).")
@click.option("--base", "base", default=None,
              help="The unedited model (path or 'toy'); default: the edited folder's manifest, else the recipe's model.")
@judge_option("clip")
@click.option("--clip-x100", "clip_x100", is_flag=True, help="Report CLIP-scores ×100 instead of raw cosine.")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False),
              help="Write verify.json, junit.xml and report.html into this folder.")
@force_option("existing report files")
@click.option("--seeds", type=click.IntRange(1, 1024), default=None, help="Seeds per prompt (default: the recipe's).")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Sampler steps (default: the recipe's).")
@click.option("--guidance", type=click.FloatRange(min=0, max=100, min_open=True), default=None,
              help="Classifier-free guidance scale (default: the recipe's, else 4 on the toy world, 7.5 otherwise).")
@click.option("--prompts", "prompts_per_group", type=click.IntRange(1, 1000), default=None,
              help="Prompts per group (efficacy, generalization, generic); default 8. Specificity: 4 held-out "
                   "prompts per neighbour at the default, half this number below it.")
@device_option
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Generate the base model's images again instead of reusing an earlier verify's from the "
                   "editc cache (kept per base model, judge, prompts, seeds and sampler settings).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify_command(recipe_path, edited, base, clip, clip_x100, report_dir, force, seeds, steps, guidance,
                   prompts_per_group, device, no_cache, as_json, quiet):
    """Verify an edited model against its base model, edit by edit.

    With fixed seeds, both models draw the same prompts: the concept's prompts (efficacy),
    held-out paraphrases (generalization), neighbouring concepts and generic prompts
    (specificity). A judge scores every image. The recipe's `verify` thresholds decide:
    exit 0 when every gate passes, 1 when one fails, 2 on bad input.
    """
    from compiler.recipe import load_recipe
    from compiler.verify import verify_paths, write_reports
    from compiler.verify.probes import DEFAULT_PROMPTS_PER_GROUP
    from compiler.verify.report import HTML_NAME, JSON_NAME, JUNIT_NAME

    recipe = load_recipe(recipe_path)
    if report_dir is not None:
        from compiler.io import check_output_path, input_paths

        # Fail on existing reports (or reports over an input) before minutes of generation.
        for name in (JSON_NAME, JUNIT_NAME, HTML_NAME):
            check_output_path(Path(report_dir) / name, force=force, kind="file",
                              inputs=input_paths(recipe_path, base, clip))
    report = verify_paths(recipe, edited=edited, base=base, clip=clip, device=device, progress=not quiet,
                          cache=not no_cache, seeds=seeds, steps=steps, guidance=guidance,
                          clip_scale=100.0 if clip_x100 else 1.0,
                          prompts_per_group=prompts_per_group or DEFAULT_PROMPTS_PER_GROUP)
    paths = write_reports(report, report_dir, force=force) if report_dir is not None else {}
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "reports": {k: str(v) for k, v in paths.items()}}, indent=2))
    else:
        _print_summary(report, paths)
    if not report.passed:
        names = ", ".join(gate.name for gate in report.failed_gates)
        raise GateFailed(f"{len(report.failed_gates)} of {len(report.gates)} gates failed: {names}")


def _print_summary(report, paths) -> None:
    echo = click.echo
    echo(f"editc verify: {report.recipe_path}")
    echo(f"  edited {report.edited_model['path']}  vs  base {report.base_model['path']}")
    echo(f"  judge: {report.judge}")
    echo(f"  base: {report.base_images}")
    settings = report.settings
    echo(f"  {settings['images_per_model']} images per model ({len(settings['seeds'])} seeds, "
         f"{settings['steps']} steps, guidance {settings['guidance_scale']:g}); "
         + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_seconds.items()))
    width = max(len(gate.name) for gate in report.gates)
    for gate in report.gates:
        status = "SKIP" if gate.skipped else "PASS" if gate.passed else "FAIL"
        bound = "" if gate.threshold is None else f" {gate.comparison} {gate.threshold:g}"
        echo(f"  {status}  {gate.name:<{width}}  {gate.value:6.3f}{bound:<7}  {gate.message}")
    for kind, path in paths.items():
        echo(f"  wrote {kind}: {path}")
    failed = len(report.failed_gates)
    echo("PASSED" if not failed else f"FAILED ({failed} of {len(report.gates)} gates)")
