"""Single-file and delta exports, provenance and atomic writes, on the tiny fixtures.

Each format must round-trip exactly: a single file through diffusers' own loader (via
``load_model``, i.e. ``from_single_file`` with a local config), a delta through ``apply`` to
either layout; a checkpoint that is not the delta's base is refused without ``--force``; the
input is never modified, and the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compiler.cli import main
from compiler.errors import UserError
from compiler.export.delta import apply_delta, export_delta, read_delta
from compiler.export.provenance import REQUIRED_KEYS, provenance_metadata, read_provenance
from compiler.export.single_file import export_single_file
from compiler.models.safetensors_file import SafetensorsFile
from compiler.models.load import load_model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit(model, layers=(0, 1), text=True, seed=0) -> dict[str, torch.Tensor]:
    """Random new values for the K/V of some cross-attention layers and the text encoder's
    layer-0 out_proj and q_proj (q_proj lives inside OpenCLIP's fused in_proj on sd2/sdxl)."""
    pipe = model.pipeline
    g = torch.Generator().manual_seed(seed)
    edited = {}
    for layer in model.registry.layers(layers):
        for name in (layer.to_k, layer.to_v):
            edited["unet/" + name] = torch.randn(pipe.unet.get_parameter(name).shape, generator=g)
    if text:
        for layer0 in model.registry.text_layer0:
            encoder = getattr(pipe, layer0.component)
            for name in (layer0.weight, layer0.weight.replace("out_proj", "q_proj")):
                edited[f"{layer0.component}/{name}"] = torch.randn(encoder.get_parameter(name).shape, generator=g)
    return edited


def _parameter(pipe, qualified: str) -> torch.Tensor:
    component, name = qualified.split("/", 1)
    return getattr(pipe, component).get_parameter(name)


def _provenance(model, edited) -> dict[str, str]:
    return provenance_metadata(recipe_text="edits:\n  - concept: van gogh\n", base_model_sha256=model.model_hash,
                               edited_tensors=edited, method="locoedit", lam=0.01, layers=[0, 1],
                               solve_seconds=0.25)


def _assert_holds_exactly(loaded, edited, base) -> None:
    """``loaded`` has the edited values (in its dtype) and every other tensor of ``base``."""
    for qualified, value in edited.items():
        got = _parameter(loaded.pipeline, qualified)
        assert torch.equal(got, value.to(got.dtype)), qualified
    for component in ("unet", "text_encoder", "vae"):
        new_state = getattr(loaded.pipeline, component).state_dict()
        for name, tensor in getattr(base.pipeline, component).state_dict().items():
            if f"{component}/{name}" not in edited:
                assert torch.equal(new_state[name], tensor), f"{component}/{name} changed"


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


# (the atomic writer's own tests: tests/test_io.py)


def test_provenance_says_what_was_edited_from_what():
    metadata = provenance_metadata(recipe_text="x: 1", base_model_sha256="0" * 64, edited_tensors=["unet/b", "unet/a"],
                                   method="locoedit", lam=0.01, layers=[9, 8], solve_seconds=0.25)
    assert metadata["editc.recipe_sha256"] == hashlib.sha256(b"x: 1").hexdigest()
    assert metadata["editc.recipe"] == "x: 1" and metadata["editc.base_model_sha256"] == "0" * 64
    assert json.loads(metadata["editc.edited_tensors"]) == ["unet/a", "unet/b"]
    assert (metadata["editc.method"], float(metadata["editc.lambda"])) == ("locoedit", 0.01)
    assert json.loads(metadata["editc.layers"]) == [8, 9] and metadata["editc.solve_seconds"] == "0.250"
    with pytest.raises(ValueError, match="string"):  # safetensors metadata holds strings only
        provenance_metadata(recipe_text="x: 1", base_model_sha256="0" * 64, edited_tensors=[], method="m",
                            lam=0.01, layers=[], extra={"note": 3})


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd2_with_extras(tmp_path_factory, tiny) -> Path:
    """The sd2 tiny single file plus EMA and vendor keys and vendor metadata."""
    tensors = load_file(str(tiny("sd2", "single-file")))
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(12345, dtype=torch.int32)
    tensors["vendor.watermark"] = torch.arange(7, dtype=torch.uint8)
    path = tmp_path_factory.mktemp("extras") / "sd2-extras.safetensors"
    save_file(tensors, str(path), metadata={"vendor.note": "keep me", "modelspec.title": "tiny sd2"})
    return path


def test_single_file_is_the_source_patched_tensor_by_tensor(sd2_with_extras, tmp_path):
    source_hash = _sha256(sd2_with_extras)
    base = load_model(sd2_with_extras)
    edited = _edit(base)
    out = export_single_file(edited, base, tmp_path / "edited.safetensors", _provenance(base, edited))
    assert _sha256(sd2_with_extras) == source_hash  # the input is never modified

    before, after = SafetensorsFile.read(sd2_with_extras), SafetensorsFile.read(out)
    assert list(after.entries) == list(before.entries)  # same keys, same order
    assert after.entries == before.entries  # same dtypes, shapes and byte ranges
    assert after.metadata["vendor.note"] == "keep me"
    assert after.metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert after.metadata["modelspec.title"] == "tiny sd2 (edited by editc: locoedit, recipe remove van gogh)"
    assert set(REQUIRED_KEYS) <= set(after.metadata)
    patched = {n for n in before.entries if not torch.equal(before.tensor(n), after.tensor(n))}
    # K/V of two layers, the text out_proj and the fused in_proj (holding q_proj): 6 tensors.
    assert len(patched) == 6 and any(n.endswith("attn.in_proj_weight") for n in patched)
    assert after.tensor("vendor.watermark").tolist() == list(range(7))

    loaded = load_model(out)  # diffusers' from_single_file, offline
    _assert_holds_exactly(loaded, edited, base)
    assert read_provenance(out)["editc.method"] == "locoedit"


def test_single_file_from_diffusers_folder_loads_with_the_edits(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # modelspec.date: the same day for both
    base = load_model(tiny("sdxl"))
    edited = _edit(base, layers=(0, 45))
    out = export_single_file(edited, base, tmp_path / "xl.safetensors", _provenance(base, edited))
    loaded = load_model(out)
    assert loaded.family == "sdxl" and loaded.source_format == "single-file"
    _assert_holds_exactly(loaded, edited, base)
    again = export_single_file(edited, base, tmp_path / "xl-again.safetensors", _provenance(base, edited))
    assert _sha256(again) == _sha256(out)  # identical inputs, identical bytes


# --------------------------------------------------------------------------------------------
# Deltas
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_delta(tmp_path_factory, tiny):
    base = load_model(tiny("sd1"))
    edited = _edit(base)
    folder = tmp_path_factory.mktemp("delta")
    path = export_delta(edited, base, folder / "delta.safetensors", _provenance(base, edited))
    return base, edited, path


def test_delta_holds_only_the_edited_tensors_with_provenance(sd1_delta, tmp_path):
    base, edited, path = sd1_delta
    delta = read_delta(path)
    assert sorted(delta.tensors) == sorted(edited)
    assert path.stat().st_size < 200_000
    assert set(REQUIRED_KEYS) <= set(delta.metadata)
    names = json.loads(delta.metadata["editc.delta.original_names"])
    assert names[next(n for n in edited if "attn2.to_k" in n)].startswith("model.diffusion_model.input_blocks.")
    again = export_delta(edited, base, tmp_path / "again.safetensors", _provenance(base, edited))
    assert _sha256(again) == _sha256(path)


@pytest.mark.parametrize("layout", ["diffusers", "single-file"])
def test_delta_applies_to_either_layout_of_its_base(sd1_delta, tiny, tmp_path, layout):
    base, edited, delta = sd1_delta
    target = tiny("sd1", layout)
    target_hash = _sha256(target) if layout == "single-file" else None
    out = tmp_path / ("applied.safetensors" if layout == "single-file" else "applied")
    result = apply_delta(delta, target, out)
    assert result.base_match == ("hash" if layout == "diffusers" else "tensors")
    if target_hash:
        assert _sha256(target) == target_hash
    loaded = load_model(out)
    _assert_holds_exactly(loaded, edited, base)
    assert read_provenance(out)["editc.recipe_sha256"] == read_delta(delta).metadata["editc.recipe_sha256"]
    again = tmp_path / ("again.safetensors" if layout == "single-file" else "again")
    apply_delta(delta, target, again)
    files = [out] if layout == "single-file" else sorted(p for p in out.rglob("*") if p.is_file())
    for file in files:
        assert _sha256(file) == _sha256(again / file.relative_to(out) if layout == "diffusers" else again)


def test_apply_refuses_another_base_without_force(sd1_delta, tmp_path):
    from compiler.testing.tiny import write_tiny

    _, edited, delta = sd1_delta
    other = write_tiny("sd1", "single-file", tmp_path / "other.safetensors", seed=1)
    runner = CliRunner()
    out = tmp_path / "out.safetensors"
    refused = runner.invoke(main, ["apply", str(delta), "--to", str(other), "--out", str(out)])
    assert refused.exit_code == 2, refused.output
    assert "not the delta's base" in refused.output and "--force" in refused.output
    assert not out.exists()
    forced = runner.invoke(main, ["apply", str(delta), "--to", str(other), "--out", str(out), "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output)["base_match"] == "forced"
    loaded = load_model(out)
    for qualified, value in edited.items():
        assert torch.equal(_parameter(loaded.pipeline, qualified), value.to(loaded.dtype))
    again = runner.invoke(main, ["apply", str(delta), "--to", str(other), "--out", str(out), "--force"])
    assert again.exit_code == 0  # --force also replaces the output
    exists = runner.invoke(main, ["apply", str(delta), "--to", str(other), "--out", str(out)])
    assert exists.exit_code == 2


def test_cli_export_single_file_carries_provenance(sd1_delta, tmp_path):
    _, edited, delta = sd1_delta
    from compiler.testing.tiny import write_tiny

    base_folder = write_tiny("sd1", "diffusers", tmp_path / "base")
    edited_folder = tmp_path / "edited"
    apply_delta(delta, base_folder, edited_folder)
    out = tmp_path / "edited.safetensors"
    result = CliRunner().invoke(main, ["export", "single-file", str(edited_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_provenance(out)["editc.method"] == "locoedit"
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1"
    loaded = load_model(out)
    for qualified, value in edited.items():
        assert torch.equal(_parameter(loaded.pipeline, qualified), value.to(loaded.dtype))


def test_apply_refuses_a_base_changed_in_place_with_size_and_mtime_kept(sd1_delta, tiny, tmp_path):
    """The hash cache must not vouch for changed bytes: a tensor the delta edits is zeroed in
    the base after a first apply cached its hash (the size and mtime are restored)."""
    import os
    import shutil

    _, edited, delta = sd1_delta
    base = tmp_path / "base"
    shutil.copytree(tiny("sd1"), base)
    assert apply_delta(delta, base, tmp_path / "first").base_match == "hash"
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    table = SafetensorsFile.read(weights)
    name = next(n.split("/", 1)[1] for n in edited if n.startswith("unet/"))
    start, end = table.entries[name]["data_offsets"]
    stat = weights.stat()
    with weights.open("r+b") as f:
        f.seek(table.data_start + start)
        f.write(b"\0" * (end - start))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    refused = CliRunner().invoke(main, ["apply", str(delta), "--to", str(base), "--out", str(tmp_path / "second")])
    assert refused.exit_code == 2 and "not the delta's base" in refused.stderr
    assert not (tmp_path / "second").exists()

def test_single_file_metadata_drops_stale_hashes_and_states_no_guess_as_fact(tmp_path):
    """An edited single file: the source's data hashes go (the data changed), date, resolution
    and title are the edit's; an SD-2 file without metadata gets no guessed prediction type
    unless --prediction-type says it, and inspect marks the guess."""
    import json as _json

    from compiler.export.single_file import export_single_file, modelspec_metadata
    from compiler.models.checkpoint import read_safetensors_header
    from compiler.testing.tiny import write_tiny

    source = {"modelspec.hash_sha256": "0xabc", "sshs_model_hash": "abc", "sshs_legacy_hash": "12345678",
              "modelspec.date": "2023-01-01", "modelspec.title": "Dreamy 2", "ss_sd_model_name": "base.ckpt",
              "modelspec.resolution": "640x640"}
    provenance = {"editc.method": "locoedit", "editc.recipe_sha256": "f" * 64, "editc.base_model_sha256": "e" * 64,
                  "editc.recipe": "edits:\n  - concept: van gogh\n    replacement: a painting\n"}
    metadata = modelspec_metadata(source, "sd1", "epsilon", provenance, source_name="dreamy")
    assert not {"modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash"} & set(metadata)
    assert metadata["ss_sd_model_name"] == "base.ckpt" and metadata["modelspec.resolution"] == "640x640"
    assert metadata["modelspec.date"] != "2023-01-01" and metadata["modelspec.date"][:2] == "20"
    assert metadata["modelspec.title"] == "Dreamy 2 (edited by editc: locoedit, recipe van gogh -> a painting)"
    untitled = modelspec_metadata({}, "sdxl", "epsilon", provenance, source_name="my_model")
    assert untitled["modelspec.title"].startswith("my_model (edited by editc")
    assert untitled["modelspec.resolution"] == "1024x1024"

    write_tiny("sd2", "single-file", tmp_path / "sd2.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "sd2.safetensors")])
    assert result.exit_code == 0 and "prediction  v_prediction (guessed" in result.output
    export_single_file({}, tmp_path / "sd2.safetensors", tmp_path / "guess.safetensors", {})
    guessed = read_safetensors_header(tmp_path / "guess.safetensors")[1]
    assert "modelspec.prediction_type" not in guessed and "modelspec.resolution" not in guessed
    assert guessed["editc.prediction_type_guessed"].startswith("v_prediction")
    result = CliRunner().invoke(main, ["export", "single-file", str(tmp_path / "sd2.safetensors"), "--out",
                                       str(tmp_path / "told.safetensors"), "--prediction-type", "epsilon",
                                       "--resolution", "512x512"])
    assert result.exit_code == 0, result.output
    told = read_safetensors_header(tmp_path / "told.safetensors")[1]
    assert told["modelspec.prediction_type"] == "epsilon" and told["modelspec.resolution"] == "512x512"
    assert told["modelspec.architecture"] == "stable-diffusion-v2-512" and "editc.prediction_type_guessed" not in told
    assert _json.dumps(told)  # all strings


def test_sd2_single_file_from_diffusers_has_the_original_24_text_blocks(tmp_path):
    """diffusers keeps 23 of OpenCLIP-H's 24 blocks (SD-2 reads the penultimate layer); the
    single file gets the 24th back (as an identity block) and the text_projection, so its text
    tower has the original layout, and it loads back to the same 23-layer encoder."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from compiler.models.configs import config_metadata
    from compiler.models.layout import pipeline_to_original
    from compiler.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd2")
    config = CLIPTextConfig.from_dict({**pipe.text_encoder.config.to_dict(), "num_hidden_layers": 23})
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(config).eval()
    state = {k: v.contiguous() for k, v in pipeline_to_original("sd2", pipe.components).items()}
    prefix = "cond_stage_model.model."
    blocks = {int(k.split(".")[4]) for k in state if k.startswith(prefix + "transformer.resblocks.")}
    assert blocks == set(range(24))
    block = prefix + "transformer.resblocks.23."
    assert not state[block + "attn.out_proj.weight"].any() and not state[block + "mlp.c_proj.weight"].any()
    assert torch.equal(state[block + "ln_1.weight"], torch.ones_like(state[block + "ln_1.weight"]))
    assert prefix + "text_projection" in state
    save_file(state, tmp_path / "sd2.safetensors", metadata=config_metadata(pipe.components))
    loaded = load_model(tmp_path / "sd2.safetensors")
    assert loaded.pipeline.text_encoder.config.num_hidden_layers == 23
    ids = pipe.tokenizer(["a red house"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = pipe.text_encoder(ids).last_hidden_state
        got = loaded.pipeline.text_encoder(ids).last_hidden_state
    assert torch.equal(want, got)


def test_sd2_diffusers_folder_streams_to_a_single_file_with_the_24th_block(tmp_path):
    """The same completion when a 23-layer SD-2 diffusers folder is exported tensor by tensor
    (editc export / compile --format single-file): the added block and projection are written
    too (they have no diffusers source tensor), equal to the in-memory conversion's."""
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from compiler.export.single_file import export_single_file
    from compiler.models.layout import pipeline_to_original
    from compiler.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd2")
    config = CLIPTextConfig.from_dict({**pipe.text_encoder.config.to_dict(), "num_hidden_layers": 23})
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(config).eval()
    pipe.save_pretrained(tmp_path / "sd2", safe_serialization=True)
    out = tmp_path / "sd2.safetensors"
    export_single_file({}, tmp_path / "sd2", out, {}, force=True)
    want = pipeline_to_original("sd2", pipe.components)
    prefix = "cond_stage_model.model."
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(want)
        projection = f.get_tensor(prefix + "text_projection")
        assert torch.equal(projection, torch.eye(projection.shape[0], dtype=projection.dtype))
        for key in (prefix + "transformer.resblocks.23.ln_1.weight", prefix + "transformer.resblocks.23.attn.in_proj_weight",
                    prefix + "transformer.resblocks.22.attn.in_proj_weight"):
            assert torch.equal(f.get_tensor(key), want[key].to(f.get_tensor(key).dtype)), key
