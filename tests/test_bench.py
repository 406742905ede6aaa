"""Smoke tests of the benchmark: every baseline runs (2 steps for the fine-tuning ones) on the
quick toy model and changes exactly the weights it should; the harness runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from compiler.bench import edits as bench_edits, scaling, timing  # noqa: E402
from compiler.bench.baselines import (EditTask, aligned_token_rows, all_token_rows, closed_form_kv_update,  # noqa: E402
                             cross_attention_kv_names)
from compiler.bench.baselines.concept_ablation import ConceptAblationConfig, train_concept_ablation  # noqa: E402
from compiler.bench.baselines.esd import ESDConfig, train_esd  # noqa: E402
from compiler.bench.baselines.time_edit import time_edit  # noqa: E402
from compiler.bench.baselines.uce import UCEConfig, uce_edit  # noqa: E402

STYLE = EditTask("van gogh", "a painting", "style")
OBJECT = EditTask("snoopy", "a dog", "object")


@pytest.fixture(scope="module")
def toy(quick_toy):
    from compiler.models.load import load_model

    loaded = load_model(str(quick_toy))
    loaded.pipeline.set_progress_bar_config(disable=True)
    return loaded


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{component}/{name}": value.clone()
            for component in ("unet", "text_encoder") for name, value in getattr(pipe, component).state_dict().items()}


def _check_changes(toy, result, allowed) -> None:
    """The result names exactly the ``allowed`` tensors, each really changed, and the pipeline
    it was computed from is untouched."""
    assert set(result.new_tensors) == set(allowed)
    for name, value in result.new_tensors.items():
        component, param = name.split("/", 1)
        old = getattr(toy.pipeline, component).get_parameter(param)
        assert value.shape == old.shape and value.dtype == old.dtype
        assert not torch.equal(value, old), f"{name} did not change"


def test_esd_x_trains_only_cross_attention(toy):
    before = _state(toy.pipeline)
    result = train_esd(toy.pipeline, STYLE, ESDConfig(steps=2, ddim_steps=4, learning_rate=1e-3), progress=False)
    attn2 = [n for n in before if n.startswith("unet/") and ".attn2." in n]
    assert len(attn2) == 16 * 5  # to_q, to_k, to_v (no bias), to_out.0 weight and bias
    _check_changes(toy, result, attn2)
    assert result.info["steps"] == 2 and result.info["seconds_per_step"] > 0
    after = _state(toy.pipeline)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_concept_ablation_trains_only_cross_attention_kv(toy):
    before = _state(toy.pipeline)
    config = ConceptAblationConfig(steps=2, batch_size=2, learning_rate=1e-3, anchor_images=2,
                                   anchor_sampling_steps=2, anchor_guidance=4.0)
    result = train_concept_ablation(toy.pipeline, OBJECT, config, progress=False)
    _check_changes(toy, result, cross_attention_kv_names(toy.registry))
    assert result.info["anchor_images"] == 2
    after = _state(toy.pipeline)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("edit", [uce_edit, time_edit], ids=["uce", "time"])
def test_closed_form_peers_edit_every_cross_attention_kv(toy, edit):
    before = _state(toy.pipeline)
    result = edit(toy, STYLE)
    names = cross_attention_kv_names(toy.registry)
    assert len(names) == 32
    _check_changes(toy, result, names)
    after = _state(toy.pipeline)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_uce_matches_the_published_formula(toy):
    """W = (λŴ + Σ v* cᵀ + p Σ Ŵ c_p c_pᵀ)(λI + Σ c cᵀ + p Σ c_p c_pᵀ)⁻¹, computed directly."""
    pipe = toy.pipeline
    config = UCEConfig(lam=0.5, erase_scale=1.0, preserve_scale=0.1)
    preserve = ["a red house", "a blue star in the style of monet"]
    result = uce_edit(toy, STYLE, config, preserve_prompts=preserve)
    sources, targets = aligned_token_rows(pipe, STYLE.prompt_pairs(), STYLE.concept, STYLE.replacement)
    kept = all_token_rows(pipe, preserve)
    layer = toy.registry.cross_attention[5]
    old = pipe.unet.get_parameter(layer.to_v).detach().double()
    eye = torch.eye(old.shape[1], dtype=torch.float64)
    mat1 = config.lam * old + (old @ targets.T) @ sources + config.preserve_scale * (old @ kept.T) @ kept
    mat2 = config.lam * eye + sources.T @ sources + config.preserve_scale * kept.T @ kept
    expected = mat1 @ torch.inverse(mat2)
    assert torch.allclose(result.new_tensors[f"unet/{layer.to_v}"].double(), expected, atol=1e-4, rtol=1e-4)


def test_closed_form_update_keeps_weights_for_zero_rows(toy):
    """No edit rows: λŴ(λI)⁻¹ = Ŵ."""
    dim = toy.registry.cross_attention[0].context_dim
    zero = torch.zeros(dim, dim, dtype=torch.float64)
    new = closed_form_kv_update(toy.pipeline, toy.registry, zero, zero, lam=0.1)
    for name, value in new.items():
        old = toy.pipeline.unet.get_parameter(name.split("/", 1)[1])
        assert torch.allclose(value, old, atol=1e-6)


def test_uce_and_time_rows_align_concept_and_replacement_tokens(toy):
    pairs = OBJECT.prompt_pairs()[:3]
    sources, targets = aligned_token_rows(toy.pipeline, pairs, OBJECT.concept, OBJECT.replacement)
    assert sources.shape == targets.shape and sources.dtype == torch.float64
    # "snoopy" is one token shorter than "a dog": 77 - (index of 'dog') rows per prompt
    from compiler.resolve import last_token_index

    expected = sum(77 - last_token_index(toy.pipeline.tokenizer, p.target, OBJECT.replacement) for p in pairs)
    assert sources.shape[0] == expected


def test_edited_weights_are_restored(toy):
    result = time_edit(toy, OBJECT)
    before = _state(toy.pipeline)
    with bench_edits.edited_weights(toy.pipeline, result.new_tensors):
        name = next(iter(result.new_tensors))
        assert torch.equal(toy.pipeline.unet.get_parameter(name.split("/", 1)[1]), result.new_tensors[name])
    after = _state(toy.pipeline)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["locoedit", "quickfix", "quickfix-v", "neurons"])
def test_editc_methods_compile_in_memory(toy, method):
    settings = timing.BenchSettings.quick()
    result = timing.run_method(method, toy, "style", STYLE, (2, 3, 4), settings, progress=False)
    prefix = {"quickfix": "text_encoder/encoder.layers.0.self_attn.out_proj",
              "quickfix-v": "text_encoder/encoder.layers.0.self_attn.v_proj"}.get(method, "unet/")
    assert result.new_tensors and all(name.startswith(prefix) for name in result.new_tensors)
    if prefix == "unet/":
        layers = {toy.registry.cross_attention[j] for j in (2, 3, 4)}
        assert set(result.new_tensors) == {f"unet/{n}" for layer in layers for n in (layer.to_k, layer.to_v)}
    assert result.seconds > 0


def test_scaling_recipes_are_valid_up_to_100_concepts():
    from compiler.recipe import loads_recipe

    layers = {"style": [2, 3, 4], "object": [5, 6], "fact": [6, 7]}
    edits = scaling.scaling_edits(100, layers)
    assert len(edits) == 100 and len({e["concept"] for e in edits}) == 100
    assert [e["concept"] for e in edits[:3]] == ["van gogh", "snoopy", "the british monarch"]
    recipe = loads_recipe(bench_edits.editc_recipe_text("toy", edits), "scaling.yaml")
    assert len(recipe.edits) == 100
    assert {e.attribute for e in recipe.edits} == {"style", "object", "fact"}
    assert scaling.scaling_edits(1, layers)[0]["concept"] == "van gogh"
    # As method: auto picks: facts by Diff-QuickFix at v_proj, the rest LocoEdit on their layers.
    methods = {(e.attribute, e.method, e.site) for e in recipe.edits}
    assert methods == {("style", "locoedit", None), ("object", "locoedit", None), ("fact", "quickfix", "v_proj")}
    every = loads_recipe(bench_edits.editc_recipe_text("toy", scaling.scaling_edits(10, layers, "locoedit")), "s.yaml")
    assert {e.method for e in every.edits} == {"locoedit"}


def _editc(*args):
    from click.testing import CliRunner

    from compiler.cli import main

    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_editc_bench_quick_writes_json_and_table(quick_toy, tmp_path):
    out = tmp_path / "results"
    result = _editc("--quick", "--model", quick_toy, "--out", out, "--methods", "esd-x,time,locoedit",
                    "--kinds", "style", "--no-scaling", "--quiet")
    assert result.exit_code == 0, result.output[-2000:]
    assert "| Edit | Method | Time (s)" in result.stdout
    report = json.loads((out / "bench_toy_quick.json").read_text())
    assert (out / "bench_toy_quick.md").is_file()
    methods = {(r["kind"], r["method"]) for r in report["methods"]}
    assert methods == {("style", "esd-x"), ("style", "time"), ("style", "locoedit")}
    for row in report["methods"]:
        assert row["median_seconds"] > 0 and row["median_cpu_seconds"] > 0
        assert set(row["quality"]) >= {"efficacy", "generalization", "neighbours", "generic", "gates"}
    assert report["ratios"]["style"]["locoedit"]["esd-x"]["measured"] > 0
    assert report["ratios"]["style"]["locoedit"]["esd-x"]["measured_cpu"] > 0
    assert report["stage_cpu_seconds"]["total"] > 0 and report["locate"]["style"]["source"].startswith("fixed")
    assert len(report["methods"][1]["seconds"]) == 2  # --quick: 2 timed repeats of each closed form


def test_editc_bench_bad_input_exits_2(tmp_path):
    result = _editc("--methods", "dreambooth", "--model", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "dreambooth" in result.stderr
    result = _editc("--model", tmp_path / "missing")
    assert result.exit_code == 2 and "missing" in result.stderr


def _write_clip_folder(folder: Path) -> Path:
    """A tiny random transformers CLIPModel folder with the real CLIP tokenizer (the judge)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(str(REPO / "compiler" / "assets" / "tokenizers" / "clip")).save_pretrained(folder)
    return folder


@pytest.mark.slow  # minutes of CPU: generation on tiny SD-2 and SD-XL; run with `pytest -m slow`
def test_real_checkpoint_script_runs_on_sd2_and_sdxl_layouts(tiny, tmp_path):
    """bench/real_checkpoints.py, unchanged, on tiny random SD-2 and SD-XL checkpoints (CPU)."""
    clip = _write_clip_folder(tmp_path / "clip")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real_checkpoints.py"), "--model", f"tsd2={tiny('sd2')}",
         "--model", f"tsdxl={tiny('sdxl')}", "--clip", clip, "--device", "cpu", "--out", out, "--quick",
         "--methods", "esd-x,concept-ablation,uce,locoedit", "--kinds", "object", "--layers", "2,3",
         "--esd-steps", "1", "--ca-steps", "1", "--repeats", "1", "--no-scaling", "--quiet"],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for name, family in (("tsd2", "sd2"), ("tsdxl", "sdxl")):
        report = json.loads((out / f"bench_{name}_quick.json").read_text())
        assert report["model"]["family"] == family
        assert {r["method"] for r in report["methods"]} == {"esd-x", "concept-ablation", "uce", "locoedit"}
        assert "## " + name in result.stdout


def test_real_checkpoint_script_rejects_bad_models(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "real_checkpoints.py"), "--model", "nopath",
                             "--clip", tmp_path], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "NAME=PATH" in result.stderr
