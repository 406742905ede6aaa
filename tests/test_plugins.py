"""Adding an edit method or an export format is one class/module plus one registry entry: a
plug-in registered here is accepted by recipe validation (with its own key), planned, solved and
reported by compile, with nothing else changed."""

from __future__ import annotations

import click
import pytest
import torch

import compiler as editc
from compiler import methods
from compiler.compile import compile_edits, plan_edits
from compiler.fuse import get_parameter
from compiler.methods.base import EditMethod, MethodField, Solved


def _parse_factor(validator, value, field_path):
    return validator.number(value, field_path, positive=True)


class ScaleValues(EditMethod):
    """A deliberately simple method: multiply the located layers' to_v by ``factor``."""

    name = "scale-values"
    title = "scale values"
    summary = "multiply the located layers' to_v"
    fields = (MethodField("factor", _parse_factor, 1.0),)

    def build_rows(self, context, plans):
        return None

    def solve(self, context, plans, rows):
        new = {}
        for plan in plans:
            for j in plan.layers:
                name = f"unet/{context.model.registry.cross_attention[j].to_v}"
                new[name] = get_parameter(context.pipeline, name).detach() * plan.edit.option("factor")
        return [Solved(new, {"method": self.name, "tensors": sorted(new)})]


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, ScaleValues.name, ScaleValues())  # the one registry line


def test_a_registered_method_is_validated_planned_and_solved(registered, quick_toy):
    from compiler.models.load import load_model

    recipe = editc.loads_recipe(
        f"model: {quick_toy}\nedits: [{{concept: van gogh, replacement: a painting, attribute: style, "
        "method: scale-values, layers: [3], factor: 0.5}]\n", "plugin.yaml")
    assert recipe.edits[0].option("factor") == 0.5
    with pytest.raises(editc.UserError, match=r"edits\[0\]\.factor: only applies to method scale-values"):
        editc.loads_recipe("edits: [{concept: van gogh, replacement: a painting, attribute: style, "
                           "method: locoedit, factor: 0.5}]", "plugin.yaml")
    model = load_model(str(quick_toy))
    result = compile_edits(recipe, model, plan_edits(recipe, model))
    (name,) = result.new_tensors
    assert name.endswith("attn2.to_v.weight")
    assert torch.equal(result.new_tensors[name], get_parameter(model.pipeline, name).detach() * 0.5)
    assert result.solve_info == [{"method": "scale-values", "tensors": [name]}]


def test_the_format_registry_drives_recipe_and_cli_choices():
    from click.testing import CliRunner

    from compiler.cli import main
    from compiler.export.formats import FORMATS

    assert editc.Recipe(edits=[editc.Edit(concept="van gogh", replacement="a painting", attribute="style")],
                        outputs=editc.Outputs(formats=tuple(FORMATS))).outputs.formats == tuple(FORMATS)
    result = CliRunner().invoke(main, ["compile", "x.yaml", "--format", "tarball"])
    assert result.exit_code == 2 and all(name in result.output for name in FORMATS)


# A format plug-in that reads the model as a pipeline (as ONNX does): it asks the job for the
# pipeline holding the edit. This module is the format's module; one registry line adds it.
_SEEN: dict[str, torch.Tensor] = {}


def write_output(job) -> dict:
    pipeline = job.edited_pipeline()
    assert job.edited_pipeline() is pipeline  # built and fused once per job
    for name in job.new_tensors:
        _SEEN[name] = get_parameter(pipeline, name).detach().clone()
    (job.folder / "probe.txt").write_text("\n".join(sorted(job.new_tensors)) + "\n")
    return {"pipeline-probe": str(job.out / "probe.txt")}


def test_a_registered_format_reads_the_pipeline_holding_the_edit(monkeypatch, quick_toy, tmp_path):
    from click.testing import CliRunner

    from compiler.cli import main
    from compiler.compile import compile_to_disk
    from compiler.export.delta import read_delta
    from compiler.export.formats import FORMATS, ExportFormat
    from compiler.models.selective import open_model

    monkeypatch.setitem(FORMATS, "pipeline-probe", ExportFormat("pipeline-probe", __name__, "reads the pipeline"))
    _SEEN.clear()
    recipe = editc.loads_recipe(
        f"model: {quick_toy}\nedits: [{{concept: van gogh, replacement: a painting, attribute: style, "
        "method: locoedit, layers: [3]}]\n", "probe.yaml")
    manifest = compile_to_disk(recipe, out=tmp_path / "out", formats=("delta", "pipeline-probe"), force=True,
                               verify=False, progress=False)
    assert (tmp_path / "out" / "probe.txt").is_file() and "fuse" in manifest["timings_seconds"]
    delta = read_delta(tmp_path / "out" / "delta.safetensors")
    base = open_model(str(quick_toy)).read_tensors(delta.tensors)
    assert sorted(_SEEN) == sorted(delta.tensors) and _SEEN
    for name, stored in delta.tensors.items():
        assert torch.equal(_SEEN[name].to(stored.dtype), stored), name  # the edited weights ...
        assert not torch.equal(_SEEN[name].to(stored.dtype), base[name]), name  # ... not the base's
    # A format with a command is an `editc export` subcommand; one without is not.
    monkeypatch.setitem(FORMATS, "pipeline-probe", ExportFormat("pipeline-probe", __name__, "probe", command="probe"))
    assert "pipeline-probe" in CliRunner().invoke(main, ["export", "--help"]).output
    assert "delta " not in CliRunner().invoke(main, ["export", "--help"]).output


@click.command("pipeline-probe")
def probe() -> None:
    """Print the probe's name."""
    click.echo("pipeline-probe")
