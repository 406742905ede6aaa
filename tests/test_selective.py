"""Compile reads only what it edits, keeps the checkpoint's dtype, and caches PᵀP (issue 13)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compiler.models.checkpoint import read_safetensors_header
from compiler.recipe import loads_recipe

# A LocoEdit edit on two UNet layers and a Diff-QuickFix edit of the text encoder: both kinds
# of tensors get written, and neither needs LocoGen (layers are given).
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
outputs:
  formats: [diffusers]
"""


@pytest.fixture(scope="module")
def fp16_models(tmp_path_factory):
    from compiler.testing.tiny import write_tiny

    root = tmp_path_factory.mktemp("fp16")
    return {"diffusers": write_tiny("sd1", "diffusers", root / "sd1", dtype=torch.float16),
            "single-file": write_tiny("sd1", "single-file", root / "sd1.safetensors", dtype=torch.float16)}


def _compile(model: Path, out: Path, formats, tmp_path: Path, **kwargs) -> dict:
    from compiler.compile import compile_to_disk

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(model=model))
    recipe = loads_recipe(recipe_path.read_text(), str(recipe_path))
    return compile_to_disk(recipe, out=out, formats=formats, force=True, verify=False, progress=False, **kwargs)


def _no_pipeline(monkeypatch):
    """Building the diffusers pipeline (UNet, VAE) fails the test."""
    import compiler.models.load as load
    import compiler.models.selective as selective

    def refuse(*args, **kwargs):
        raise AssertionError("compile built the whole pipeline")

    monkeypatch.setattr(load, "load_pipeline", refuse)
    monkeypatch.setattr(selective, "load_pipeline", refuse)


@pytest.mark.parametrize("source", ["diffusers", "single-file"])
def test_fp16_in_gives_fp16_out_in_every_format_with_provenance(fp16_models, source, tmp_path, monkeypatch):
    _no_pipeline(monkeypatch)
    out = tmp_path / "out"
    manifest = _compile(fp16_models[source], out, ("diffusers", "single-file", "delta"), tmp_path)
    files = sorted(out.rglob("*.safetensors"))
    assert {f.name for f in files} >= {"model.safetensors", "delta.safetensors", "diffusion_pytorch_model.safetensors"}
    for f in files:
        header, metadata = read_safetensors_header(f)
        floats = {v["dtype"] for v in header.values() if v["dtype"].startswith(("F", "BF"))}
        assert floats == {"F16"}, (f, floats)
    # Provenance: the single file, the delta and each edited component's file name the recipe.
    edited_files = [out / "model.safetensors", out / "delta.safetensors",
                    out / "unet" / "diffusion_pytorch_model.safetensors", out / "text_encoder" / "model.safetensors"]
    for f in edited_files:
        assert read_safetensors_header(f)[1].get("editc.recipe_sha256") == manifest["recipe"]["sha256"], f
    assert manifest["model_reads"]["pipeline_loaded"] is False


def test_compile_reads_only_the_text_encoder_and_the_edited_tensors(tiny, tmp_path, monkeypatch):
    _no_pipeline(monkeypatch)
    model = tiny("sd1", "single-file")
    manifest = _compile(model, tmp_path / "out", ("delta",), tmp_path)
    header, _ = read_safetensors_header(model)
    text_tensors = [k for k in header if k.startswith("cond_stage_model.")]
    unet_tensors = [k for k in header if k.startswith("model.diffusion_model.")]
    edited = manifest["edited_tensors"]
    assert len(edited) == 2 * 2 + 1  # two layers' K and V, one out_proj
    # Every text-encoder tensor once, then the four edited UNet tensors: not the UNet's hundreds.
    reads = manifest["model_reads"]["tensors_read"]
    assert reads <= len(text_tensors) + len(edited), (reads, len(text_tensors), len(unet_tensors))
    assert len(unet_tensors) > 10 * 4


def _delta_tensors(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "delta.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _cache_counts(manifest: dict) -> tuple[int, int]:
    stats = [s["preserve_cache"] for s in manifest["solves"] if "preserve_cache" in s]
    return sum(s["hits"] for s in stats), sum(s["misses"] for s in stats)


def test_preservation_cache_hit_on_second_compile_invalidated_by_a_new_text_encoder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITC_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "sd1"
    shutil.copytree(tiny("sd1"), model)
    first = _compile(model, tmp_path / "a", ("delta",), tmp_path)
    second = _compile(model, tmp_path / "b", ("delta",), tmp_path)
    # Layer-0 inputs for three preservation groups (the found neighbours, the replacement's
    # prompts, the generic captions), then the UNet contexts by the encoder holding the fact's
    # edit for those three and the fact's own prompts: all computed, then all found.
    assert _cache_counts(first) == (0, 7)
    assert _cache_counts(second) == (7, 0)
    # The style edit's own rows too: its sources by the edited encoder, its targets by the base.
    assert first["solves"][0]["edit_rows_cache"] == {"hits": 0, "misses": 2}
    assert second["solves"][0]["edit_rows_cache"] == {"hits": 2, "misses": 0}
    assert list((tmp_path / "cache" / "edit-rows").glob("*.safetensors"))
    assert list((tmp_path / "cache" / "preserve-gram").glob("*.safetensors"))

    # The same edited tensors, bit for bit, with the cache, from the cache, and without it.
    monkeypatch.setenv("EDITC_NO_PRESERVE_CACHE", "1")
    uncached = _compile(model, tmp_path / "c", ("delta",), tmp_path)
    assert _cache_counts(uncached) == (0, 7)
    a, b, c = (_delta_tensors(tmp_path / d) for d in "abc")
    assert a.keys() == b.keys() == c.keys() and len(a) == 5
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    monkeypatch.delenv("EDITC_NO_PRESERVE_CACHE")

    # A different text encoder (one tensor changed) finds nothing; the UNet's files don't count.
    weights = model / "text_encoder" / "model.safetensors"
    from safetensors.torch import save_file

    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    name = next(k for k in tensors if k.endswith("layers.1.mlp.fc1.weight"))
    tensors[name] = tensors[name] * 1.01
    os.unlink(weights)  # a new file (the old one may be hard-linked into outputs)
    save_file(tensors, str(weights), metadata=metadata)
    changed = _compile(model, tmp_path / "d", ("delta",), tmp_path)
    assert _cache_counts(changed) == (0, 7)


def test_another_recipe_on_the_same_model_finds_the_generic_captions_cached(tiny, tmp_path, monkeypatch):
    """The generic captions (the bulk of the preservation rows) are the same for every recipe
    on a model: a recipe editing another concept embeds only its own neighbours' prompts."""
    monkeypatch.setenv("EDITC_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny("sd1")
    _compile(model, tmp_path / "a", ("delta",), tmp_path)
    (tmp_path / "other").mkdir()
    from compiler.compile import compile_to_disk

    other = tmp_path / "other" / "recipe.yaml"
    other.write_text(RECIPE.format(model=model).replace("van gogh", "claude monet"))
    manifest = compile_to_disk(loads_recipe(other.read_text(), str(other)), out=tmp_path / "b",
                               formats=("delta",), force=True, verify=False, progress=False)
    # Layer-0 inputs: captions and replacements' prompts found, the new concept's neighbours
    # computed. The UNet contexts come from the encoder holding this recipe's fact edit, which
    # differs from the first recipe's (its solve held other neighbours): all four computed.
    assert _cache_counts(manifest) == (2, 5)
    # A new concept's source rows computed; its targets ("… a painting") found.
    assert manifest["solves"][0]["edit_rows_cache"] == {"hits": 1, "misses": 1}


def test_neighbour_states_are_encoded_once_per_text_encoder(tiny, tmp_path, monkeypatch):
    """Ranking neighbours encodes the whole vocabulary's attribute; the second ranking on the
    same text encoder (another recipe, another concept) encodes only the prompts it has not seen,
    and finds the same neighbours."""
    from compiler import resolve
    from compiler.encode import PromptEncoder
    from compiler.models.selective import open_model

    monkeypatch.setenv("EDITC_CACHE_DIR", str(tmp_path / "cache"))
    encoded: list[int] = []
    original = PromptEncoder.context_rows

    def counting(self, prompts, positions):
        encoded.append(len(prompts))
        return original(self, prompts, positions)

    monkeypatch.setattr(PromptEncoder, "context_rows", counting)
    model = open_model(tiny("sd1"))
    vocabulary = resolve.vocabulary_of(model)
    first = resolve.find_neighbours(model, vocabulary, "van gogh", "style", k=4, avoid=["a painting"])
    assert sum(encoded) > 200  # every style of the real vocabulary, in two templates
    encoded.clear()
    again = resolve.find_neighbours(open_model(tiny("sd1")), vocabulary, "van gogh", "style", k=4,
                                    avoid=["a painting"])
    assert encoded == [] and again == first
    other = resolve.find_neighbours(model, vocabulary, "claude monet", "style", k=4, avoid=["a painting"])
    assert sum(encoded) <= 2 and len(other) == 4  # only "van gogh" in its two templates is new
    assert list((tmp_path / "cache" / "prompt-states").glob("*.safetensors"))
