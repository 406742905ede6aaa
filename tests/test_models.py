"""Model loading, family detection, layout tables and the layer registry, on tiny fixtures."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from compiler.errors import UserError
from compiler.models.checkpoint import read_single_file
from compiler.models.configs import (config_folder, infer_single_file_configs, load_shipped_configs,
                                     shipped_config_folder)
from compiler.models.families import FAMILIES, detect_family, known_location
from compiler.models.layout import (single_file_components, UNetLayout, component_to_original,
                                    unet_name_to_original)

EXPECTED_LAYERS = {"sd1": 16, "sd2": 16, "sdxl": 70, "if": 22}  # IF: the tiny IF-I layout
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline"}


# ---- the table ---------------------------------------------------------------------------------


def test_known_locations_are_the_papers():
    assert known_location("sd1", "style").layers == [8, 9]
    assert known_location("sd1", "object").layers == [6, 7]
    assert known_location("sd2", "fact").layers == [7, 8, 9]
    assert known_location("sdxl", "style").layers == [45, 46, 47]
    assert known_location("sdxl", "object").layers == [15, 16, 17, 18, 19]
    assert known_location("if", "style") is None
    assert [FAMILIES[f].cross_attention_layers for f in ("sd1", "sd2", "sdxl")] == [16, 16, 70]


def test_unet_names_in_the_original_layout():
    sd = UNetLayout.from_config(load_shipped_configs("sd1")["unet"])
    assert (unet_name_to_original("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", sd)
            == "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    assert (unet_name_to_original("up_blocks.3.attentions.2.transformer_blocks.0.attn2", sd)
            == "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2")
    assert (unet_name_to_original("mid_block.resnets.1.conv2.weight", sd)
            == "model.diffusion_model.middle_block.2.out_layers.3.weight")
    assert (unet_name_to_original("down_blocks.2.downsamplers.0.conv.bias", sd)
            == "model.diffusion_model.input_blocks.9.0.op.bias")
    assert (unet_name_to_original("up_blocks.1.upsamplers.0.conv.weight", sd)
            == "model.diffusion_model.output_blocks.5.2.conv.weight")
    assert (unet_name_to_original("up_blocks.0.upsamplers.0.conv.weight", sd)
            == "model.diffusion_model.output_blocks.2.1.conv.weight")  # no attention at level 0
    xl = UNetLayout.from_config(load_shipped_configs("sdxl")["unet"])
    assert (unet_name_to_original("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v.weight", xl)
            == "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_v.weight")
    assert unet_name_to_original("add_embedding.linear_2.bias", xl) == "model.diffusion_model.label_emb.0.2.bias"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_reference_size_single_files_get_the_shipped_configs(family):
    """A full-size single file (its names and shapes, built on the meta device from the shipped
    configs) infers exactly the shipped configs, so real SD-1.5/2.1/XL load with the shipped
    folder as is."""
    from compiler.models.load import build_meta

    shipped = load_shipped_configs(family)
    shapes = {}
    for component in single_file_components(family):
        meta = build_meta(shipped, component)
        config = shipped[component] if component in ("unet", "vae") else {}
        for name, t in component_to_original(family, component, meta.state_dict(), config).items():
            shapes[name] = tuple(t.shape)
    if family == "sd2":  # real SD-2 files hold a 24th OpenCLIP block that SD-2 does not use
        for name in [n for n in shapes if ".resblocks.22." in n]:
            shapes[name.replace(".resblocks.22.", ".resblocks.23.")] = shapes[name]
    detection = detect_family(shapes, {}, family)
    assert detection.family == family and detection.matches_reference_widths
    assert detection.context_dim == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]  # CLIP-L, OpenCLIP-H, both
    inferred = infer_single_file_configs(detection, shapes, None)
    assert inferred == shipped
    with config_folder(family, inferred) as folder:
        assert folder == shipped_config_folder(family)


# ---- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detect_family_of_single_files(tiny, family):
    header = read_single_file(tiny(family, "single-file"))
    detection = detect_family(header.shapes, header.metadata, "x")
    assert detection.family == family
    assert not detection.matches_reference_widths  # tiny widths
    assert detection.context_dim == {"sd1": 32, "sd2": 64, "sdxl": 96}[family]


def test_modelspec_metadata_is_read_and_checked(tiny):
    shapes = read_single_file(tiny("sd2", "single-file")).shapes
    d = detect_family(shapes, {"modelspec.architecture": "stable-diffusion-v2-512"}, "x")
    assert d.prediction_type == "epsilon"
    d = detect_family(shapes, {"modelspec.architecture": "stable-diffusion-v2-768-v"}, "x")
    assert d.prediction_type == "v_prediction"
    with pytest.raises(UserError, match="ModelSpec metadata says 'stable-diffusion-xl-v1-base'"):
        detect_family(shapes, {"modelspec.architecture": "stable-diffusion-xl-v1-base"}, "x")
    with pytest.raises(UserError, match="LoRA"):
        detect_family(shapes, {"modelspec.architecture": "stable-diffusion-v1-lora"}, "x")


def test_mixed_parts_are_rejected(tiny):
    sd1 = read_single_file(tiny("sd1", "single-file")).shapes
    sd2 = read_single_file(tiny("sd2", "single-file")).shapes
    text = {k: v for k, v in sd1.items() if k.startswith("cond_stage_model.")}
    unet = {k: v for k, v in sd2.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(UserError, match="inconsistent sd1 checkpoint"):
        detect_family({**text, **unet}, {}, "x")
    with pytest.raises(UserError, match="unknown checkpoint layout"):
        detect_family(unet, {}, "x")


# ---- loading and the registry -----------------------------------------------------------------

CASES = [("sd1", "diffusers", ""), ("sd2", "diffusers", ""), ("sdxl", "diffusers", ""),
         ("if", "diffusers", ""), ("sd1", "single-file", ".safetensors"),
         ("sd2", "single-file", ".safetensors"), ("sdxl", "single-file", ".safetensors"),
         ("sd1", "single-file", ".ckpt")]


@pytest.mark.parametrize("family,fmt,suffix", CASES)
def test_every_family_loads_with_its_registry(tiny, family, fmt, suffix):
    from compiler.models.load import load_model

    path = tiny(family, fmt, suffix or ".safetensors")
    model = load_model(path)
    assert model.family == family and model.source_format == fmt
    assert type(model.pipeline).__name__ == {**PIPELINES, "if": "IFPipeline"}[family]
    assert model.dtype == torch.float32
    registry = model.registry
    layers = registry.cross_attention
    assert len(layers) == EXPECTED_LAYERS[family]
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert [layer.module_name for layer in layers] == sorted(layer.module_name for layer in layers)

    unet = dict(model.pipeline.unet.named_parameters())
    for layer in layers:  # every named tensor exists, and the context width is the text width
        assert unet[layer.to_k].shape[1] == unet[layer.to_v].shape[1] == layer.context_dim
    if family == "sd1":  # the paper's SD-1.5 style window 8-9 lies in the first up block
        assert layers[6].module_name.startswith("mid_block.")
        assert layers[8].module_name == "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
        assert layers[8].original_to_k == ("model.diffusion_model.output_blocks.4.1."
                                           "transformer_blocks.0.attn2.to_k.weight")
    if family == "sdxl":
        assert layers[24].module_name == "mid_block.attentions.0.transformer_blocks.0.attn2"
        assert layers[45].module_name.startswith("up_blocks.0.attentions.1.")
    if family == "if":
        assert layers[0].to_k.endswith(".add_k_proj.weight") and layers[0].original_to_k is None

    text = registry.text_layer0
    assert [t.component for t in text] == (["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"])
    for t in text:
        params = dict(getattr(model.pipeline, t.component).named_parameters())
        assert params[t.weight].shape == (t.width, t.width)
    if fmt == "single-file":  # the original names are the file's own
        names = set(read_single_file(path).shapes)
        for layer in layers:
            assert {layer.original_to_k, layer.original_to_v} <= names
        for t in text:
            assert {t.original_weight, t.original_bias} <= names
    if family == "sd2":
        assert text[0].original_weight == "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight"
    if family == "sdxl":  # transformers >= 5.6 flattens CLIPTextModel, not ...WithProjection
        assert text[0].module_name == "encoder.layers.0.self_attn.out_proj"
        assert text[1].module_name == "text_model.encoder.layers.0.self_attn.out_proj"
        assert text[1].original_bias == "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.bias"


# CLIP's own ids (openai/clip-vit-large-patch14's tokenizer) for one of the papers' prompts.
CLIP_IDS = [49406, 320, 1212, 530, 518, 1844, 539, 2451, 19697, 49407]


@pytest.mark.parametrize("family,fmt", [("sd1", "diffusers"), ("sd2", "diffusers"), ("sdxl", "diffusers"),
                                        ("sdxl", "single-file")])
def test_tiny_fixtures_tokenize_like_clip(tiny, family, fmt):
    """Edits of a tiny fixture find the concept's tokens only if its tokenizer is CLIP's."""
    from compiler.models.load import load_model

    pipe = load_model(tiny(family, fmt)).pipeline
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    for tokenizer in tokenizers:
        assert len(tokenizer) == 49408
        assert tokenizer("a house in the style of van gogh").input_ids == CLIP_IDS


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_in_diffusers_from_single_file_with_the_same_tensors(tiny, family):
    """diffusers' own from_single_file (offline, with a config folder) reads our single files
    back into exactly the tensors of the pipeline they were written from."""
    import diffusers

    from compiler.testing.tiny import build_tiny_pipeline

    path = tiny(family, "single-file")
    header = read_single_file(path)
    configs = infer_single_file_configs(detect_family(header.shapes, {}, str(path)), header.shapes, None)
    with config_folder(family, configs) as folder:
        loaded = getattr(diffusers, PIPELINES[family]).from_single_file(
            str(path), config=str(folder), local_files_only=True)
    reference = build_tiny_pipeline(family)
    for component in single_file_components(family):
        ours = getattr(reference, component).state_dict()
        theirs = getattr(loaded, component).state_dict()
        assert set(ours) == set(theirs), component
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), f"{component}.{name}"


def test_registry_without_loading_weights_matches_the_loaded_one(tiny):
    from compiler.models.load import load_model
    from compiler.models.load import build_registry

    path = tiny("sdxl", "single-file")
    assert build_registry(path) == load_model(path).registry


def test_dtype_is_uniform_and_stored_dtype_reported(tiny, tmp_path):
    from compiler.models.load import load_model
    from compiler.testing.tiny import write_tiny

    path = write_tiny("sd1", "diffusers", tmp_path / "fp16", dtype=torch.float16)
    model = load_model(path)  # diffusers alone would give a float32 UNet and a float16 text encoder
    assert model.stored_dtype == torch.float16
    assert {p.dtype for c in ("unet", "vae", "text_encoder")
            for p in getattr(model.pipeline, c).parameters()} == {torch.float32}


def test_configs_stored_in_metadata_win_over_conventions(tmp_path):
    """A model whose heads, VAE scale and scheduler its shapes cannot tell (like the toy model)
    round-trips through a single file when its configs are stored in the metadata."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from compiler.models.configs import config_metadata
    from compiler.models.layout import pipeline_to_original
    from compiler.models.load import load_model
    from compiler.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    config = pipe.text_encoder.config.to_dict()
    config["num_attention_heads"] = 4  # the convention would say 1 at width 32
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config))
    text_encoder.load_state_dict(pipe.text_encoder.state_dict())
    pipe.text_encoder = text_encoder
    pipe.vae.register_to_config(scaling_factor=4.0)
    pipe.scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    state = pipeline_to_original("sd1", pipe.components)

    save_file(state, tmp_path / "plain.safetensors")
    plain = load_model(tmp_path / "plain.safetensors").pipeline
    assert plain.text_encoder.config.num_attention_heads == 1  # what shapes alone can tell

    save_file(state, tmp_path / "described.safetensors", metadata=config_metadata(pipe.components))
    model = load_model(tmp_path / "described.safetensors")
    assert model.pipeline.text_encoder.config.num_attention_heads == 4
    assert model.pipeline.vae.config.scaling_factor == 4.0
    assert type(model.pipeline.scheduler).__name__ == "DDIMScheduler"
    assert torch.equal(model.pipeline.text_encoder.state_dict()["encoder.layers.1.mlp.fc2.weight"],
                       pipe.text_encoder.state_dict()["encoder.layers.1.mlp.fc2.weight"])


def test_variant_only_folder_loads(tmp_path):
    from compiler.models.load import load_model
    from compiler.testing.tiny import build_tiny_pipeline

    build_tiny_pipeline("sd1").save_pretrained(tmp_path / "fp16", variant="fp16")
    assert not (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model = load_model(tmp_path / "fp16")
    assert len(model.registry.cross_attention) == 16


def test_sd2_prediction_type(tiny):
    from compiler.models.load import inspect_source

    path = tiny("sd2", "single-file")
    assert inspect_source(path).prediction_type == "v_prediction"
    assert "assumed v_prediction" in " ".join(inspect_source(path).notes)
    source = inspect_source(path, prediction_type="epsilon")
    assert source.configs["scheduler"]["prediction_type"] == "epsilon"
    assert source.configs["unet"]["sample_size"] == 64


def test_model_hash_is_sha256_of_the_file_and_cached(tiny):
    from compiler.models.hashing import _cache_file, file_sha256
    from compiler.models.load import inspect_source, source_hash

    path = tiny("sd1", "single-file", ".ckpt")
    assert source_hash(inspect_source(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(_cache_file().read_text())[str(path.resolve())]["sha256"] == file_sha256(path)
    folder = tiny("sd1")
    assert source_hash(inspect_source(folder)) == source_hash(inspect_source(folder))


def test_toy_missing_says_how_to_build_it(monkeypatch, tmp_path):
    from compiler.models import load

    monkeypatch.setattr(load, "TOY_PIPELINE", tmp_path / "nowhere")
    with pytest.raises(UserError, match="make train-toy"):
        load.load_model("toy")
