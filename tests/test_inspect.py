"""``editc inspect``: the report for every family and format, and one clear line (exit 2) for
every kind of bad checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from compiler.cli import main

CASES = [("sd1", "diffusers", ""), ("sd2", "diffusers", ""), ("sdxl", "diffusers", ""),
         ("if", "diffusers", ""), ("sd1", "single-file", ".safetensors"),
         ("sd2", "single-file", ".safetensors"), ("sdxl", "single-file", ".safetensors"),
         ("sd1", "single-file", ".ckpt")]
LAYERS = {"sd1": 16, "sd2": 16, "sdxl": 70, "if": 22}


def run(*args: str):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


@pytest.mark.parametrize("family,fmt,suffix", CASES)
def test_inspect_reports_family_format_and_layers(tiny, family, fmt, suffix):
    path = tiny(family, fmt, suffix or ".safetensors")
    result = run(path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"family      {family}:" in out and f"format      {fmt}" in out
    assert f"Cross-attention layers: {LAYERS[family]}" in out
    assert "sha256:" in out and "Provenance: none" in out

    data = json.loads(run(path, "--json").stdout)
    assert data["family"] == family and data["format"] == fmt
    assert len(data["cross_attention"]) == LAYERS[family]
    first = data["cross_attention"][0]
    assert set(first) == {"index", "module_name", "to_k", "to_v", "original_to_k", "original_to_v",
                          "context_dim"}
    if family != "if":
        assert first["original_to_k"].startswith("model.diffusion_model.input_blocks.")
        assert data["known_locations"]["style"]
    assert len(data["text_layer0"]) == (2 if family == "sdxl" else 1)


def test_inspect_load_builds_the_pipeline(tiny):
    result = run(tiny("sd2", "single-file"), "--load", "--prediction-type", "epsilon")
    assert result.exit_code == 0, result.output
    assert "loaded      yes" in result.stdout and "prediction  epsilon" in result.stdout


def test_inspect_shows_editc_provenance(tmp_path):
    from compiler.testing.tiny import write_tiny

    path = write_tiny("sd1", "single-file", tmp_path / "edited.safetensors",
                      metadata={"editc.recipe_sha256": "abc123", "editc.lambda": "0.01",
                                "modelspec.title": "not ours"})
    result = run(path)
    assert result.exit_code == 0, result.output
    assert "Provenance (2 editc.* metadata keys)" in result.stdout
    assert "editc.recipe_sha256  abc123" in result.stdout and "not ours" not in result.stdout
    assert json.loads(run(path, "--json").stdout)["provenance"] == {
        "editc.lambda": "0.01", "editc.recipe_sha256": "abc123"}


# ---- bad checkpoints: exit 2, one line, no traceback -------------------------------------------


def _truncated(tiny, tmp_path):
    src = tiny("sd1", "single-file")
    data = src.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "t.safetensors"


def _empty(tiny, tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    return tmp_path / "e.safetensors"


def _not_safetensors(tiny, tmp_path):
    (tmp_path / "n.safetensors").write_bytes(b"<html>404 Not Found</html>\n" * 40)
    return tmp_path / "n.safetensors"


def _corrupt_header(tiny, tmp_path):
    header = b'{"a.weight": {"dtype": "F32", "shape": [2]'  # not valid JSON
    (tmp_path / "c.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    return tmp_path / "c.safetensors"


def _unknown_keys(tiny, tmp_path):
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4)}, tmp_path / "u.safetensors")
    return tmp_path / "u.safetensors"


def _lora(tiny, tmp_path):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)},
              tmp_path / "l.safetensors")
    return tmp_path / "l.safetensors"


def _wrong_family_parts(tiny, tmp_path):
    """SD-1's text encoder with SD-2's UNet: each part is valid, the whole is no family."""
    from safetensors.torch import load_file

    sd1, sd2 = load_file(tiny("sd1", "single-file")), load_file(tiny("sd2", "single-file"))
    mixed = {k: v for k, v in sd2.items() if not k.startswith("cond_stage_model.")}
    mixed.update({k: v for k, v in sd1.items() if k.startswith("cond_stage_model.")})
    save_file(mixed, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


def _no_vae(tiny, tmp_path):
    from safetensors.torch import load_file

    full = load_file(tiny("sd1", "single-file"))
    save_file({k: v for k, v in full.items() if not k.startswith("first_stage_model.")},
              tmp_path / "novae.safetensors")
    return tmp_path / "novae.safetensors"


def _missing_tensor(tiny, tmp_path):
    from safetensors.torch import load_file

    full = load_file(tiny("sd1", "single-file"))
    del full["model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"]
    save_file(full, tmp_path / "hole.safetensors")
    return tmp_path / "hole.safetensors"


def _truncated_ckpt(tiny, tmp_path):
    data = tiny("sd1", "single-file", ".ckpt").read_bytes()
    (tmp_path / "t.ckpt").write_bytes(data[: len(data) // 3])
    return tmp_path / "t.ckpt"


class _Pickled:  # an arbitrary object: a safe (weights_only) load must refuse it
    pass


def _pickled_ckpt(tiny, tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": _Pickled()}, tmp_path / "p.ckpt")
    return tmp_path / "p.ckpt"


def _missing_component(tiny, tmp_path):
    folder = tmp_path / "novae"
    shutil.copytree(tiny("sd1"), folder)
    shutil.rmtree(folder / "vae")
    return folder


def _truncated_component(tiny, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(tiny("sd1"), folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return folder


def _no_model_index(tiny, tmp_path):
    folder = tmp_path / "noindex"
    shutil.copytree(tiny("sd1"), folder)
    (folder / "model_index.json").unlink()
    return folder


def _config_does_not_match_weights(tiny, tmp_path):
    folder = tmp_path / "badconfig"
    shutil.copytree(tiny("sd1"), folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 64, 96]
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    return folder


def _superres_stage(tiny, tmp_path):
    folder = tmp_path / "if2"
    shutil.copytree(tiny("if"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "IFSuperResolutionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _wrong_extension(tiny, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    return tmp_path / "model.onnx"


def _nonexistent(tiny, tmp_path):
    return tmp_path / "does-not-exist.safetensors"


BAD = {
    "truncated": (_truncated, "truncated"),
    "empty": (_empty, "empty"),
    "not-safetensors": (_not_safetensors, "not a safetensors file"),
    "corrupt-header": (_corrupt_header, "not valid JSON"),
    "unknown-keys": (_unknown_keys, "no UNet weights"),
    "lora": (_lora, "LoRA"),
    "wrong-family-parts": (_wrong_family_parts, "inconsistent sd1 checkpoint"),
    "no-vae": (_no_vae, "no VAE weights"),
    "missing-tensor": (_missing_tensor, "incomplete sd1 checkpoint — 1 tensor of its layout missing"),
    "truncated-ckpt": (_truncated_ckpt, "truncated or corrupt .ckpt"),
    "pickled-ckpt": (_pickled_ckpt, "weights_only"),
    "missing-component": (_missing_component, "component 'vae' listed in model_index.json is missing"),
    "truncated-component": (_truncated_component, "truncated"),
    "no-model-index": (_no_model_index, "no model_index.json"),
    "config-mismatch": (_config_does_not_match_weights, "do not belong to this config"),
    "if-super-resolution": (_superres_stage, "super-resolution stage"),
    "wrong-extension": (_wrong_extension, "unknown checkpoint file type"),
    "nonexistent": (_nonexistent, "no such file or folder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_exits_2_with_one_line(tiny, tmp_path, case):
    make, expected = BAD[case]
    path = make(tiny, tmp_path)
    result = run(path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("editc: error: ") and expected in lines[0], lines[0]
    assert str(path) in lines[0] and "Traceback" not in result.output
    assert result.stdout == ""


def test_bad_checkpoint_in_a_real_process(tiny, tmp_path):
    """The installed entry point, not just the click runner: one line on stderr, exit 2."""
    path = _truncated(tiny, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "compiler.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"editc: error: {path}: truncated")
