"""``editc recipe check FILE``: validate a recipe and print what it asks for."""

from __future__ import annotations

import json

import click

from compiler.cli import main
from compiler.methods import AUTO, REGISTRY, get_method
from compiler.recipe import Edit, Recipe, load_recipe


@main.group()
def recipe() -> None:
    """Work with recipe files (YAML or TOML)."""


@recipe.command("check")
@click.argument("file", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the parsed recipe as JSON.")
def check(file: str, as_json: bool) -> None:
    """Validate FILE: exit 0 and a summary when it is valid, else exit 2 with one line
    naming the file, the field and what would be valid."""
    parsed = load_recipe(file)
    if as_json:
        click.echo(json.dumps({"valid": True, **parsed.to_dict()}, indent=2))
        return
    click.echo(format_summary(parsed))


def _layers_text(edit: Edit) -> str:
    if edit.layers is None:  # a method that edits no UNet layers says where it edits
        return get_method(edit.method).where(edit)
    if isinstance(edit.layers, tuple):
        return "layers " + ",".join(str(index) for index in edit.layers)
    return f"layers {edit.layers}"


def _methods_of(edit: Edit):
    """The method plug-in of the edit; for ``auto``, every one whose keys auto accepts."""
    if edit.method != AUTO:
        return [get_method(edit.method)]
    return [method for method in REGISTRY.values() if any(spec.with_auto for spec in method.fields)]


def format_summary(parsed: Recipe) -> str:
    """A short human summary of a valid recipe."""
    count = len(parsed.edits)
    lines = [
        f"{parsed.path}: valid recipe, {count} edit{'s' if count != 1 else ''} "
        f"(sha256 {parsed.sha256[:12]})",
        f"  model:    {parsed.model}",
        f"  lambda:   {parsed.lambda_:g}",
    ]
    if parsed.preserve:
        lines.append(f"  preserve: {', '.join(parsed.preserve)}")
    lines.append("  edits:")
    for index, edit in enumerate(parsed.edits):
        details = [edit.attribute, f"method {edit.method}", _layers_text(edit)]
        if edit.lambda_ is not None:
            details.append(f"lambda {edit.lambda_:g}")
        if edit.eos is False:
            details.append("eos off")
        details += [detail for method in _methods_of(edit) for detail in method.edit_details(edit)]
        if edit.prompts:
            details.append(f"+{len(edit.prompts)} prompts")
        if edit.preserve:
            details.append(f"preserve {', '.join(edit.preserve)}")
        lines.append(
            f"    [{index}] {edit.concept} -> {edit.replacement} ({', '.join(details)})"
        )
    destination = parsed.outputs.dir or "(set by compile --out)"
    lines.append(f"  outputs:  {', '.join(parsed.outputs.formats)} -> {destination}")
    gates = parsed.verify
    lines.append(
        f"  verify:   {'on' if gates.enabled else 'off'} (efficacy <= "
        f"{gates.efficacy_max_accuracy:g}, fact >= {gates.fact_min_accuracy:g}, specificity "
        f"drop <= {gates.specificity_max_drop:g}; {gates.seeds} seeds, {gates.steps} steps)"
    )
    return "\n".join(lines)
