"""A family is data plus hooks in one place (issue 24): a made-up family, a renamed SD-1 variant
with its own single-file key prefix and ModelSpec id, is registered here with one
``register_family`` call and is then detected, compiled, exported (diffusers folder, single file,
delta) and inspected with nothing else changed."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from compiler.models import families
from compiler.models.families import FAMILIES, register_family
from compiler.recipe import loads_recipe

PREFIX = "cond_stage_model.renamed."

RECIPE = """
model: {model}
edits:
  - concept: van gogh
    replacement: a painting
    attribute: style
    method: locoedit
    layers: [0, 1]
  - concept: the british monarch
    replacement: king charles
    attribute: fact
    method: quickfix
"""


def _renamed_sd1() -> families.Family:
    sd1 = FAMILIES["sd1"]
    return dataclasses.replace(
        sd1, name="sd1-renamed", title="SD-1, renamed",
        text_encoders=(dataclasses.replace(sd1.text_encoders[0], original_prefix=PREFIX),),
        shipped_configs="sd1", single_file_evidence="",
        modelspec_architectures={"sd1-renamed-v1": None},
        modelspec_implementation="https://example.invalid/sd1-renamed",
        claims_diffusers=lambda model_index, unet, text: model_index.get("_variant_of") == "sd1-renamed")


@pytest.fixture
def renamed():
    family = register_family(_renamed_sd1())  # the one line a new family needs
    yield family
    FAMILIES.pop(family.name)


def _compile(model, out, formats, tmp_path):
    from compiler.compile import compile_to_disk

    recipe = loads_recipe(RECIPE.format(model=model), str(tmp_path / "recipe.yaml"))
    return compile_to_disk(recipe, out=out, formats=formats, force=True, verify=False, progress=False)


def test_a_registered_family_is_detected_compiled_exported_and_inspected(renamed, tiny, tmp_path):
    from compiler.cli.inspect_cmd import inspect_report
    from compiler.export.delta import read_delta
    from compiler.export.single_file import export_single_file
    from compiler.models.checkpoint import read_safetensors_header

    model = tmp_path / "model"
    shutil.copytree(tiny("sd1"), model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_variant_of": "sd1-renamed"}))

    assert inspect_report(str(model))["family"] == "sd1-renamed"
    manifest = _compile(model, tmp_path / "out", ("diffusers", "single-file", "delta"), tmp_path)
    assert manifest["base_model"]["family"] == "sd1-renamed"
    out = tmp_path / "out"
    edited = manifest["edited_tensors"]
    assert any(n.startswith("text_encoder/") for n in edited) and any(n.startswith("unet/") for n in edited)

    # The single file uses the family's own text-encoder prefix and ModelSpec id, and reads back
    # as the family from its keys alone.
    header, metadata = read_safetensors_header(out / "model.safetensors")
    assert any(k.startswith(PREFIX) for k in header)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in header)
    assert metadata["modelspec.architecture"] == "sd1-renamed-v1"
    assert metadata["modelspec.implementation"] == "https://example.invalid/sd1-renamed"
    single = inspect_report(str(out / "model.safetensors"))
    assert single["family"] == "sd1-renamed"
    assert inspect_report(str(out))["family"] == "sd1-renamed"  # the diffusers folder written

    # The delta names the family's single-file keys; the base written as the family's single
    # file compiles to the same edited tensors as the folder did.
    delta = read_delta(out / "delta.safetensors")
    originals = json.loads(delta.metadata["editc.delta.original_names"])
    assert any(v.startswith(PREFIX) for v in originals.values())
    base_file = export_single_file({}, model, tmp_path / "base.safetensors", {})
    again = _compile(base_file, tmp_path / "again", ("delta",), tmp_path)
    assert again["base_model"]["family"] == "sd1-renamed"
    redo = read_delta(tmp_path / "again" / "delta.safetensors")
    assert sorted(redo.tensors) == sorted(delta.tensors)
    for name, tensor in delta.tensors.items():
        assert torch.allclose(redo.tensors[name].float(), tensor.float(), atol=1e-5), name


def test_without_its_hook_the_folder_is_plain_sd1(tiny):
    from compiler.cli.inspect_cmd import inspect_report

    assert "sd1-renamed" not in FAMILIES
    assert inspect_report(str(tiny("sd1")))["family"] == "sd1"
