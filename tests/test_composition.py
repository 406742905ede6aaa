"""A recipe that edits the text encoder and the UNet: the UNet edits are solved on what the
edited text encoder gives them (issue 25: a fact's Diff-QuickFix beside a style's LocoEdit)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from compiler import compile as compile_stage
from compiler.encode import PromptEncoder
from compiler.recipe import loads_recipe

ROOT = Path(__file__).resolve().parent.parent
V_PROJ = "text_encoder/text_model.encoder.layers.0.self_attn.v_proj.weight"

FACT = """  - concept: the british monarch
    replacement: king charles
    attribute: fact
    method: quickfix
    site: v_proj
"""
STYLE = """  - concept: van gogh
    replacement: a painting
    attribute: style
    method: locoedit
    layers: {layers}
"""


def _recipe(model, *edits: str, neighbours: int = 0):
    return loads_recipe(f"model: {model}\nlambda: 0.01\nneighbours: {neighbours}\nedits:\n" + "".join(edits),
                        "composition.yaml")


def _v_proj(model) -> torch.Tensor:
    encoder = model.text_encoder("text_encoder")
    for name in (V_PROJ.split("/", 1)[1], V_PROJ.split("/", 1)[1].replace("text_model.", "", 1)):
        try:
            return encoder.get_parameter(name)
        except AttributeError:
            continue
    raise AssertionError("no layer-0 v_proj")


def test_unet_rows_come_from_the_edited_text_encoder_and_targets_from_the_base(tiny, monkeypatch):
    from compiler.models.selective import open_model

    path = tiny("sd1")
    model = open_model(str(path))
    base = _v_proj(model).detach().clone()
    seen = []  # (prompts, v_proj as the encoder held it then)
    original = PromptEncoder.context_rows

    def spy(self, prompts, positions):
        seen.append((list(prompts), _v_proj(self.model).detach().clone()))
        return original(self, prompts, positions)

    monkeypatch.setattr(PromptEncoder, "context_rows", spy)
    recipe = _recipe(path, STYLE.format(layers="[2, 3, 4]"), FACT)
    result = compile_stage.compile_edits(recipe, model, compile_stage.plan_edits(recipe, model), preserve_cache=False)

    fact_name = next(n for n in result.new_tensors if n.startswith("text_encoder/") and "v_proj" in n)
    edited = result.new_tensors[fact_name].to(base.dtype)
    assert not torch.equal(edited, base)
    assert [info["method"] for info in result.solve_info][0] == "quickfix"  # text edits first
    sources = [w for prompts, w in seen if prompts and all("van gogh" in p for p in prompts)]
    targets = [w for prompts, w in seen if prompts and all("a painting" in p and "van gogh" not in p for p in prompts)]
    assert sources and targets
    assert all(torch.equal(w, edited) for w in sources)  # what the UNet will see
    assert all(torch.equal(w, base) for w in targets)  # what the unedited model gives the replacement
    assert torch.equal(_v_proj(model), base)  # the model is left as it was read


def test_a_recipe_without_text_edits_embeds_with_the_base_encoder(tiny, monkeypatch):
    from compiler.models.selective import open_model

    path = tiny("sd1")
    model = open_model(str(path))
    base = _v_proj(model).detach().clone()
    weights = []
    original = PromptEncoder.context_rows

    def spy(self, prompts, positions):
        weights.append(_v_proj(self.model).detach().clone())
        return original(self, prompts, positions)

    monkeypatch.setattr(PromptEncoder, "context_rows", spy)
    recipe = _recipe(path, STYLE.format(layers="[2, 3, 4]"))
    compile_stage.compile_edits(recipe, model, compile_stage.plan_edits(recipe, model), preserve_cache=False)
    assert weights and all(torch.equal(w, base) for w in weights)


def _judge():
    spec = importlib.util.spec_from_file_location("many_concepts", ROOT / "bench" / "many_concepts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.judge


@pytest.mark.slow
def test_a_style_beside_a_fact_keeps_its_gap_on_the_toy_world(tmp_path, monkeypatch):
    """On the embedded toy, van gogh's held-out K/V gap (bench/many_concepts.py's judge, the
    edited text encoder and UNet together) beside the british monarch's Diff-QuickFix edit stays
    within 0.06 of its gap alone (measured: 0.144 alone, 0.185 beside; 0.272 when the UNet edit
    was solved on the base encoder's contexts). ~40 s on 2 cores."""
    from compiler.models.selective import open_model

    monkeypatch.setenv("EDITC_CACHE_DIR", str(tmp_path))
    judge = _judge()
    model = open_model("toy")
    style = STYLE.format(layers=list(range(16))) + '    prompts: ["a blue square in the style of van gogh"]\n'
    gaps = {}
    for label, edits in (("alone", [style]), ("beside", [style, FACT])):
        recipe = loads_recipe("model: toy\nlambda: 0.01\npreserve: [monet, mondrian]\nedits:\n" + "".join(edits),
                              "composition.yaml")
        result = compile_stage.compile_edits(recipe, model, compile_stage.plan_edits(recipe, model))
        gaps[label] = judge(model, recipe, result.new_tensors)["gap_left"]
    print(gaps)
    assert gaps["alone"]["van gogh"] < 0.2
    assert gaps["beside"]["van gogh"] < gaps["alone"]["van gogh"] + 0.06, gaps
    assert gaps["beside"]["the british monarch"] < 0.3, gaps
