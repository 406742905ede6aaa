"""editc compile on a structurally real (quickly trained) toy model: the solve does what the
papers' equations say on real embeddings, and the command writes what it promises."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from compiler import compile as compile_stage
from compiler import resolve
from compiler.encode import PromptEncoder
from compiler.fuse import get_parameter
from compiler.recipe import loads_recipe

RECIPE = """
model: {model}
lambda: 0.01
edits:
  - concept: van gogh
    replacement: a painting
    attribute: style
    method: {method}
{layers}"""


def _recipe_text(model: Path, method: str = "locoedit") -> str:
    layers = "" if method == "quickfix" else "    layers: [2, 3, 4]\n"
    return RECIPE.format(model=model, method=method, layers=layers)


def _recipe(tmp_path: Path, model: Path, method: str = "locoedit") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe_text(model, method))
    return path


def _editc(*args: str):
    from click.testing import CliRunner

    from compiler.cli import main

    return CliRunner().invoke(main, list(args))


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_locoedit_maps_concept_onto_replacement_and_keeps_the_rest(quick_toy, tmp_path):
    from compiler.models.load import load_model

    model = load_model(str(quick_toy))
    recipe = loads_recipe(_recipe_text(quick_toy), str(tmp_path / "r.yaml"))
    plans = compile_stage.plan_edits(recipe, model)
    result = compile_stage.compile_edits(recipe, model, plans)
    pipe = model.pipeline
    encoder = PromptEncoder(model)
    pair = resolve.PromptPair("a blue star in the style of van gogh", "a blue star in the style of a painting")
    s_pos, t_pos = resolve.pair_positions(pipe.tokenizer, [pair], "van gogh", "a painting", eos=True)
    x_src = encoder.context_rows([pair.source], s_pos)
    x_tgt = encoder.context_rows([pair.target], t_pos)
    unrelated = encoder.context_rows(["a green fish in the style of monet"], [list(range(8))])
    errors, moves = [], []
    for name, new in result.new_tensors.items():
        old = get_parameter(pipe, name).detach()
        want = x_tgt @ old.T
        errors.append(((x_src @ new.T - want).norm() / want.norm()).item())
        moves.append(((unrelated @ new.T - unrelated @ old.T).norm() / (unrelated @ old.T).norm()).item())
    assert len(result.new_tensors) == 6  # 3 layers x (K, V)
    # The edited layers now send the concept where the old ones sent the replacement (within
    # 17% on this quick toy: the found neighbours, held at neighbour_weight 8, pull back)...
    assert max(errors) < 0.2, errors
    # ...while an unrelated prompt's keys and values move much less.
    assert max(moves) < 0.5 * max(errors) + 0.05, (moves, errors)


def test_a_heavier_neighbour_weight_holds_the_neighbours_closer(quick_toy, tmp_path):
    """``neighbour_weight`` is how hard the solve holds the found neighbours (and ``preserve``):
    their keys and values move less the heavier it is, at some cost to the concept's mapping."""
    from compiler.models.load import load_model

    model = load_model(str(quick_toy))
    encoder = PromptEncoder(model)
    moved, missed = {}, {}
    for weight in (1, 16):
        text = _recipe_text(quick_toy).replace("lambda: 0.01", f"lambda: 0.01\nneighbour_weight: {weight}")
        recipe = loads_recipe(text, str(tmp_path / f"w{weight}.yaml"))
        assert recipe.neighbour_weight == weight
        plans = compile_stage.plan_edits(recipe, model)
        result = compile_stage.compile_edits(recipe, model, plans)
        at_risk = next(g for g in result.preserve_groups if g.name == "at risk")
        assert at_risk.weight == weight and len(at_risk.prompts) > 8
        prompts = list(at_risk.prompts)
        rows = encoder.context_rows(prompts, resolve.all_token_positions(encoder.tokenizer(), prompts))
        pair = plans[0].pairs[0]
        s_pos, t_pos = resolve.pair_positions(encoder.tokenizer(), [pair], "van gogh", "a painting", eos=True)
        x_src, x_tgt = encoder.context_rows([pair.source], s_pos), encoder.context_rows([pair.target], t_pos)
        moves, errors = [], []
        for name, new in result.new_tensors.items():
            old = get_parameter(model.pipeline, name).detach()
            moves.append(((rows @ new.T - rows @ old.T).norm() / (rows @ old.T).norm()).item())
            errors.append(((x_src @ new.T - x_tgt @ old.T).norm() / (x_tgt @ old.T).norm()).item())
        moved[weight], missed[weight] = max(moves), max(errors)
    # Measured on the quick toy: neighbours' K/V move 3.1% -> 1.8%; the concept's rows miss
    # their targets by 10% -> 14% (the weight trades efficacy for specificity).
    assert moved[16] < 0.7 * moved[1], moved
    assert missed[1] < missed[16] < 0.2, missed


def test_same_recipe_gives_bit_identical_tensors(quick_toy, tmp_path):
    from compiler.models.load import load_model

    recipe = loads_recipe(_recipe_text(quick_toy), str(tmp_path / "r.yaml"))
    runs = []
    for _ in range(2):
        model = load_model(str(quick_toy))
        runs.append(compile_stage.compile_edits(recipe, model, compile_stage.plan_edits(recipe, model)).new_tensors)
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.parametrize("method,expected", [("locoedit", 6), ("quickfix", 1), ("neurons", 6)])
def test_cli_compile_writes_folder_and_manifest_without_touching_input(quick_toy, tmp_path, method, expected):
    before = _tree_hash(quick_toy)
    out = tmp_path / "edited"
    args = ["compile", str(_recipe(tmp_path, quick_toy, method)), "--out", str(out), "--quiet"]
    done = _editc(*args)
    assert done.exit_code == 0, done.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["edited_tensors"]) == expected
    assert manifest["edits"][0]["method"] == method
    assert set(manifest["timings_seconds"]) >= {"load", "embed", "solve", "save"}
    assert manifest["model_reads"]["pipeline_loaded"] is False  # no UNet/VAE built to compile
    assert manifest["base_model"]["sha256"] and manifest["recipe"]["sha256"]
    assert _tree_hash(quick_toy) == before  # the input checkpoint is never modified
    # Components without edits are hard links of the input, not copies.
    untouched = "vae/diffusion_pytorch_model.safetensors"
    assert os.stat(out / untouched).st_ino == os.stat(quick_toy / untouched).st_ino
    # An existing output is refused without --force: exit 2, one line.
    again = _editc(*args)
    assert again.exit_code == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "--force" in again.stderr


def test_edited_folder_loads_and_holds_the_new_tensors(quick_toy, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "edited"
    assert _editc("compile", str(_recipe(tmp_path, quick_toy)), "--out", str(out), "--quiet").exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    base = StableDiffusionPipeline.from_pretrained(str(quick_toy))
    edited = StableDiffusionPipeline.from_pretrained(str(out))
    changed = 0
    for name, param in edited.unet.named_parameters():
        same = torch.equal(param, base.unet.get_parameter(name))
        qualified = f"unet/{name}"
        assert same != (qualified in manifest["edited_tensors"]), qualified
        changed += not same
        assert param.dtype == base.unet.get_parameter(name).dtype
    assert changed == 6


def test_compile_twice_writes_byte_identical_files(quick_toy, tmp_path):
    recipe = _recipe(tmp_path, quick_toy)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert _editc("compile", str(recipe), "--out", str(out), "--quiet").exit_code == 0
        outs.append(out)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (outs[0] / weights).read_bytes() == (outs[1] / weights).read_bytes()
    from compiler.export.provenance import read_provenance

    provenance = read_provenance(outs[0] / weights)
    assert provenance["editc.method"] == "locoedit"
    assert json.loads(provenance["editc.layers"]) == [2, 3, 4]


def test_layers_auto_uses_a_confirmed_window_and_falls_back_to_all_layers_otherwise(quick_toy):
    """compile's rule for `layers: auto` on a model with no known location: the LocoGen window
    when it passed (and was confirmed at full settings), else every cross-attention layer."""
    from types import SimpleNamespace

    from compiler.models.load import load_model

    loaded = load_model(str(quick_toy))
    recipe = loads_recipe(RECIPE.format(model=quick_toy, method="locoedit", layers="    layers: auto\n"), "r.yaml")

    def result(passed: bool, confirmed: bool | None):
        confirmation = None if confirmed is None else SimpleNamespace(steps=25, best=SimpleNamespace(passed=confirmed))
        return SimpleNamespace(passed=passed, layers=(11, 12), best_size=2, confirmation=confirmation)

    def plan(res):
        (planned,) = compile_stage.plan_edits(recipe, loaded, locate_fn=lambda edit: res)
        return planned.layers, planned.layers_source.value, planned.layers_reason

    every = tuple(range(16))
    assert plan(result(True, True))[:2] == ((11, 12), "locate")
    assert plan(result(True, None))[0] == (11, 12)
    assert plan(result(False, None))[:2] == (every, "all layers")
    layers, source, reason = plan(result(True, False))
    assert layers == every and source == "all layers" and "not confirmed" in reason


FACT_RECIPE = """
model: {model}
edits:
  - concept: the british monarch
    replacement: king charles
    attribute: fact
    method: quickfix
    site: v_proj
{extra}"""


def test_attention_value_keys_reproduce_what_layer0_attention_emits(quick_toy):
    """v_proj's keys are the inputs mixed by the attention's own weights: W_h k + b_h must be
    exactly what head h hands to out_proj (whatever attention kernel the encoder runs)."""
    from compiler.models.load import load_model

    pipe = load_model(str(quick_toy)).pipeline
    attention = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn")
    prompts = ["a portrait of the british monarch", "a red circle in the style of monet"]
    positions = [list(range(resolve.eos_index(pipe.tokenizer, p) + 1)) for p in prompts]
    encoder = PromptEncoder(pipe)
    keys = encoder.value_keys(prompts, positions, attention)
    emitted = encoder.module_inputs(prompts, positions, attention.out_proj)
    heads = attention.num_heads
    w = attention.v_proj.weight.double().view(heads, -1, keys.shape[-1])
    b = attention.v_proj.bias.double().view(heads, -1)
    rebuilt = torch.einsum("hod,hrd->rho", w, keys) + b  # rows × heads × head_dim
    assert keys.shape == (heads, emitted.shape[0], emitted.shape[1])
    assert torch.allclose(rebuilt.reshape(emitted.shape).float(), emitted, atol=1e-5)


def test_quickfix_at_v_proj_moves_the_concept_and_keeps_its_old_answer(quick_toy, tmp_path):
    from compiler.models.load import load_model

    model = load_model(str(quick_toy))
    pipe = model.pipeline
    attention = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn")
    probe = [f"a photo of {who} in the style of monet" for who in ("the british monarch", "king charles", "queen elizabeth")]
    positions = [list(range(resolve.eos_index(pipe.tokenizer, p) + 1)) for p in probe]

    def emitted():  # per prompt: what layer 0's heads hand to out_proj at BOS..EOS
        rows = PromptEncoder(pipe).module_inputs(probe, positions, attention.out_proj)
        return torch.split(rows, [len(p) for p in positions])

    before = emitted()
    recipe = loads_recipe(FACT_RECIPE.format(model=quick_toy, extra=""), str(tmp_path / "r.yaml"))
    (plan,) = compile_stage.plan_edits(recipe, model)
    result = compile_stage.compile_edits(recipe, model, [plan])
    assert list(result.new_tensors) == ["text_encoder/encoder.layers.0.self_attn.v_proj.weight"]
    assert result.solve_info[0]["site"] == "v_proj" and result.solve_info[0]["heads"] == attention.num_heads
    compile_stage.apply_to_pipeline(pipe, result.new_tensors)
    after = emitted()
    subject = resolve.last_token_index(pipe.tokenizer, probe[0], "the british monarch")
    charles = resolve.last_token_index(pipe.tokenizer, probe[1], "king charles")
    want = before[1][charles]
    # The monarch's last token now gets what king charles's got (relative error small)...
    error = ((after[0][subject] - want).norm() / want.norm()).item()
    moved = ((before[0][subject] - want).norm() / want.norm()).item()
    # measured 0.22 vs 0.70 (0.16 with neighbour_weight 1: queen elizabeth, the nearest
    # neighbour, is held 8x harder by default)
    assert error < 0.35 * moved, (error, moved)
    # ...while every state of the queen elizabeth prompt (the fact's old answer) barely moves.
    drift = ((after[2] - before[2]).norm() / before[2].norm()).item()
    change = ((after[0][subject] - before[0][subject]).norm() / before[0][subject].norm()).item()
    assert drift < 0.1 * change, (drift, change)  # measured 0.03 vs 0.71


def test_an_edits_own_lambda_counts_for_quickfix(quick_toy, tmp_path):
    from compiler.models.load import load_model

    model = load_model(str(quick_toy))
    changes = {}
    for lam in ("0.01", "1.0e+6"):
        recipe = loads_recipe(FACT_RECIPE.format(model=quick_toy, extra=f"    lambda: {lam}\n"), str(tmp_path / "r.yaml"))
        result = compile_stage.compile_edits(recipe, model, compile_stage.plan_edits(recipe, model))
        (name, new), = result.new_tensors.items()
        changes[lam] = (new - get_parameter(model.pipeline, name)).norm().item()
    assert changes["1.0e+6"] < 1e-3 * changes["0.01"], changes


def test_auto_picks_quickfix_at_v_proj_for_facts_on_one_text_encoder():
    from compiler.recipe import Edit

    fact = Edit(concept="the british monarch", replacement="king charles", attribute="fact")
    style = Edit(concept="van gogh", replacement="a painting", attribute="style")
    assert compile_stage.choose_method(fact, "sd1")[:2] == ("quickfix", "v_proj")
    assert compile_stage.choose_method(fact, "sd2")[:2] == ("quickfix", "v_proj")
    assert compile_stage.choose_method(fact, "sdxl")[:2] == ("locoedit", None)  # two encoders
    assert compile_stage.choose_method(style, "sd1")[:2] == ("locoedit", None)
    explicit = Edit(concept="x", replacement="y", attribute="fact", method="quickfix", layers=None)
    assert compile_stage.choose_method(explicit, "sd1")[:2] == ("quickfix", "out_proj")  # the paper's site


def test_out_ending_in_safetensors_writes_that_single_file(tiny, tmp_path):
    """`--out edited.safetensors --format single-file` writes the file itself (a checkpoint
    A1111/ComfyUI open), not a folder of that name; with another format it is refused."""
    from click.testing import CliRunner

    from compiler.cli import main
    from compiler.models.checkpoint import read_safetensors_header
    from compiler.models.load import load_model

    recipe = _recipe(tmp_path, tiny("sd1"))
    out = tmp_path / "edited.safetensors"
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(recipe), "--out", str(out), "--format", "single-file",
                                  "--no-verify", "--quiet"])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    metadata = read_safetensors_header(out)[1]
    assert metadata["editc.method"] == "locoedit" and "modelspec.date" in metadata
    loaded = load_model(str(out))
    assert loaded.family == "sd1" and loaded.source_format == "single-file"
    refused = runner.invoke(main, ["compile", str(recipe), "--out", str(tmp_path / "x.safetensors"),
                                   "--format", "diffusers", "--no-verify", "--quiet"])
    assert refused.exit_code == 2 and "--format single-file alone" in refused.output
    assert not (tmp_path / "x.safetensors").exists()


def test_compile_states_an_sd2_prediction_type_and_resolution_when_told(tiny, tmp_path):
    from click.testing import CliRunner

    from compiler.cli import main
    from compiler.models.checkpoint import read_safetensors_header

    recipe = _recipe(tmp_path, tiny("sd2", "single-file"))
    out = tmp_path / "sd2-edited.safetensors"
    result = CliRunner().invoke(main, ["compile", str(recipe), "--out", str(out), "--format", "single-file",
                                       "--prediction-type", "epsilon", "--resolution", "512x512",
                                       "--no-verify", "--quiet"])
    assert result.exit_code == 0, result.output
    metadata = read_safetensors_header(out)[1]
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-512"
    assert metadata["modelspec.resolution"] == "512x512" and "editc.prediction_type_guessed" not in metadata
