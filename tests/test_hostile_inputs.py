"""Hostile inputs a release pipeline met: each exits 2 with one line naming the file (or recipe
field) and the fix, writes nothing, and never shows a traceback."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compiler.cli import main

def _invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_refused(result, *named: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editc: error: "), result.stderr
    assert "Traceback" not in result.output
    for text in named:
        assert text in lines[0], (text, lines[0])


@pytest.fixture()
def model_copy(quick_toy, tmp_path) -> Path:
    """A private copy of the quick toy model to damage."""
    return Path(shutil.copytree(quick_toy, tmp_path / "model"))


def _recipe(tmp_path: Path, model: Path, concept: str = "van gogh", replacement: str = "a painting") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {model}\nedits:\n  - concept: {json.dumps(concept)}\n"
                    f"    replacement: {json.dumps(replacement)}\n    attribute: style\n    layers: [0]\n")
    return path


def _compile_refused(tmp_path: Path, recipe: Path, *named: str) -> None:
    before = sorted(tmp_path.iterdir())
    _assert_refused(_invoke("compile", recipe, "--out", tmp_path / "out", "--quiet"), *named)
    assert sorted(tmp_path.iterdir()) == before, "compile wrote something"


def test_a_tokenizer_json_that_is_not_json_is_refused(model_copy, tmp_path):
    broken = model_copy / "tokenizer" / "tokenizer.json"
    broken.write_text("{ not json")
    _compile_refused(tmp_path, _recipe(tmp_path, model_copy), str(broken), "not valid JSON")


def test_a_shard_index_pointing_outside_the_model_is_refused(model_copy, tmp_path):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    index = model_copy / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    from compiler.models.checkpoint import read_safetensors_header

    names = read_safetensors_header(outside)[0]
    index.write_text(json.dumps({"weight_map": {name: "../../elsewhere.safetensors" for name in names}}))
    _compile_refused(tmp_path, _recipe(tmp_path, model_copy), str(index), "may not leave")


def _overlap_two_tensors(path: Path, first: str, second: str) -> None:
    """Point ``second``'s byte range at ``first``'s (same size), keeping the file otherwise
    valid; ``second``'s old bytes are then covered by nothing."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    a, b = header[first], header[second]
    assert a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = list(a["data_offsets"])
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + length:])


def test_overlapping_tensors_are_refused_in_a_file_compile_never_reads(model_copy, tmp_path):
    # A safety checker: editc skips the component, but an output folder would carry the file.
    from safetensors.torch import save_file

    checker = model_copy / "safety_checker"
    checker.mkdir()
    (checker / "config.json").write_text("{}")
    save_file({"vision.weight": torch.ones(4), "projection.weight": torch.zeros(4)}, checker / "model.safetensors")
    _overlap_two_tensors(checker / "model.safetensors", "projection.weight", "vision.weight")
    index = json.loads((model_copy / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    named = (str(checker / "model.safetensors"), "overlap")
    _assert_refused(_invoke("inspect", model_copy), *named)
    _compile_refused(tmp_path, _recipe(tmp_path, model_copy), *named)


def test_a_safetensors_file_with_a_hole_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "holey.safetensors"
    save_file({"a.weight": torch.ones(2)}, path)
    path.write_bytes(path.read_bytes() + b"\0" * 8)  # data the header does not index
    _assert_refused(_invoke("inspect", path), str(path), "no holes")


@pytest.mark.parametrize("concept, named", [
    ("\u200b\u200c\u200d", "no visible character"),
    ("van\u0000gogh", "control character U+0000"),
    ("<|endoftext|>", "special token"),
], ids=["zero-width", "nul", "special-token"])
def test_meaningless_concepts_are_refused(quick_toy, tmp_path, concept, named):
    _compile_refused(tmp_path, _recipe(tmp_path, quick_toy, concept), "edits[0].concept", named)


def test_a_special_token_replacement_is_refused(quick_toy, tmp_path):
    _compile_refused(tmp_path, _recipe(tmp_path, quick_toy, replacement="a <|startoftext|> painting"),
                     "edits[0].replacement", "special token")


def test_a_delta_whose_tensor_does_not_fit_the_base_is_refused(quick_toy, tmp_path):
    from compiler.export.delta import FORMAT
    from compiler.models.safetensors_file import write_safetensors
    from compiler.models.load import inspect_source, source_hash

    source = inspect_source(quick_toy)
    name = "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    delta = tmp_path / "bad.delta.safetensors"
    # The base's own hash: only the shape is wrong.
    write_safetensors({name: torch.zeros(3, 3)}, delta,
                      {"editc.delta.format": FORMAT, "editc.delta.base_model_sha256": source_hash(source)})
    out = tmp_path / "applied"
    _assert_refused(_invoke("apply", delta, "--to", quick_toy, "--out", out), str(delta), "[3, 3]", name)
    assert not out.exists()
