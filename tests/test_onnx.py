"""ONNX export checked with onnxruntime: the toy model (SD-1 layout) and the sd1/sdxl fixtures.

Every graph must match PyTorch on fixed inputs within tolerance, a model that differs from the
export must fail the check, the toy model and the SD-XL fixture must generate on onnxruntime
alone the images PyTorch generates (and, with the trained toy weights present, the judge must score them alike), fp16 and
external-data exports must load, and identical inputs must give identical files.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from compiler.cli import main
from compiler.export.onnx import OnnxParityError, check_onnx_parity, export_onnx
from compiler.export.onnx_pipeline import OnnxTextToImage
from compiler.export.provenance import read_provenance
from compiler.toy import JUDGE_DIR, PIPELINE_DIR

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
TRAINED_TOY = (PIPELINE_DIR / "model_index.json").is_file() and (JUDGE_DIR / "config.json").is_file()


@pytest.fixture(scope="module")
def toy_dir(request) -> Path:
    """The trained toy model when it is there, else the quick one (the same structure)."""
    if TRAINED_TOY:
        return PIPELINE_DIR
    return request.getfixturevalue("quick_toy")


@pytest.fixture(scope="module")
def toy_onnx(toy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "toy"
    return export_onnx(toy_dir, out)


@pytest.fixture(scope="module")
def torch_toy(toy_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(toy_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _graph_inputs(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def test_toy_export_layout_and_parity(toy_onnx):
    folder = toy_onnx.path
    for name in COMPONENTS:
        assert (folder / name / "model.onnx").is_file() and (folder / name / "config.json").is_file()
        assert toy_onnx.parity[name]["passed"] and toy_onnx.parity[name]["max_abs_error"] < 1e-4
        assert onnx.load(str(folder / name / "model.onnx"), load_external_data=False).opset_import[0].version >= 17
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert (folder / "tokenizer" / "tokenizer_config.json").is_file()
    for name in ("vocab.json", "merges.txt"):  # transformers 4's CLIPTokenizer (optimum) needs them
        assert (folder / "tokenizer" / name).stat().st_size > 100_000
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ORTStableDiffusionPipeline"  # optimum's auto classes map it
    assert index["unet"] == ["diffusers", "OnnxRuntimeModel"]
    unet_inputs = _graph_inputs(folder / "unet" / "model.onnx")
    assert unet_inputs["sample"] == ["batch", 4, "height", "width"]
    assert unet_inputs["encoder_hidden_states"][0] == "batch"
    assert _graph_inputs(folder / "text_encoder" / "model.onnx")["input_ids"] == ["batch", "sequence"]
    description = json.loads((folder / "editc_onnx.json").read_text())
    assert description["components"]["unet"]["exporter"] == "torchscript"


def test_onnxruntime_alone_generates_what_pytorch_generates(toy_onnx, torch_toy):
    runner = OnnxTextToImage(toy_onnx.path)
    prompts = ["a red circle in the style of van gogh", "a blue square", "a green triangle in the style of monet"]
    latents = runner.initial_latents([0, 1, 2], 8, 8)
    onnx_images = runner(prompts, latents=latents, steps=10, guidance=4.0)
    reference = torch_toy(prompt=prompts, latents=torch.from_numpy(latents), num_inference_steps=10,
                          guidance_scale=4.0, output_type="np").images
    torch_images = (np.clip(reference, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert onnx_images.shape == torch_images.shape == (3, 32, 32, 3)
    assert np.abs(onnx_images.astype(int) - torch_images.astype(int)).max() <= 2
    again = runner(prompts, seeds=[0, 1, 2], steps=10)
    assert np.array_equal(again, onnx_images)  # seeds give numpy's noise: the same latents


def test_judge_scores_onnxruntime_images_like_pytorch_images(toy_dir, toy_onnx, torch_toy):
    """With the trained toy model this is the real check; with the few-step stand-in (its own
    barely trained judge) it still checks that the two runtimes' images are judged alike."""
    from compiler.toy.judge import load_judge

    judge = load_judge(toy_dir, toy_dir.parent / "judge")
    shapes = ["circle", "square", "triangle", "star"]
    prompts = [f"a {c} {s} in the style of van gogh" for c in ("red", "blue") for s in shapes] + \
              [f"a {c} {s}" for c in ("green", "yellow") for s in shapes]
    runner = OnnxTextToImage(toy_onnx.path)
    latents = runner.initial_latents(list(range(len(prompts))), 8, 8)
    onnx_images = runner(prompts, latents=latents, steps=25, guidance=4.0)
    reference = torch_toy(prompt=prompts, latents=torch.from_numpy(latents), num_inference_steps=25,
                          guidance_scale=4.0, output_type="np").images
    torch_images = (np.clip(reference, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.abs(onnx_images.astype(int) - torch_images.astype(int)).max() <= 2
    same_label = np.mean([a == b for a, b in zip(judge.classify(onnx_images), judge.classify(torch_images))])
    assert same_label >= (1.0 if TRAINED_TOY else 0.9)
    gap = np.abs(judge.clip_scores(onnx_images, prompts) - judge.clip_scores(torch_images, prompts)).max()
    assert gap < 0.01


def test_a_model_that_differs_from_the_export_fails_the_check(toy_onnx, torch_toy):
    tampered = copy.deepcopy(torch_toy)
    with torch.no_grad():
        tampered.unet.conv_out.bias += 0.1
    with pytest.raises(OnnxParityError, match="unet max abs error"):
        check_onnx_parity(toy_onnx.path, tampered, family="sd1")


def test_cli_refuses_to_overwrite_an_export(toy_onnx, toy_dir):
    result = CliRunner().invoke(main, ["export", "onnx", str(toy_dir), "--out", str(toy_onnx.path)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_sd1_fp16_with_external_data_is_bit_identical(tmp_path):
    from compiler.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    provenance = {"editc.method": "locoedit", "editc.recipe_sha256": "0" * 64}
    first = export_onnx(pipe, tmp_path / "a", "fp16", external_data_threshold_bytes=0, provenance=provenance)
    assert read_provenance(tmp_path / "a") == provenance
    graph_metadata = read_provenance(tmp_path / "a" / "unet" / "model.onnx")
    assert provenance.items() <= graph_metadata.items() and graph_metadata["editc.onnx.dtype"] == "fp16"
    for name in COMPONENTS:
        assert first.parity[name]["passed"] and first.parity[name]["dtype"] == "fp16"
        assert first.components[name]["external_data"] == f"{name}/model.onnx_data"
        assert (tmp_path / "a" / name / "model.onnx_data").is_file()
    assert onnx.load(str(tmp_path / "a" / "unet" / "model.onnx"), load_external_data=False) \
        .graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    export_onnx(pipe, tmp_path / "b", "fp16", external_data_threshold_bytes=0, check=False, provenance=provenance)
    for name in COMPONENTS:
        for file in ("model.onnx", "model.onnx_data"):
            assert (tmp_path / "a" / name / file).read_bytes() == (tmp_path / "b" / name / file).read_bytes()


@pytest.fixture(scope="module")
def sdxl_export(tmp_path_factory):
    from compiler.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")
    return pipe, export_onnx(pipe, tmp_path_factory.mktemp("onnx-xl") / "xl")


def test_sdxl_exports_both_text_encoders_and_the_extra_unet_inputs(sdxl_export):
    _, result = sdxl_export
    assert set(result.parity) == {"text_encoder", "text_encoder_2", *COMPONENTS}
    assert all(check["passed"] for check in result.parity.values())
    unet_inputs = _graph_inputs(result.path / "unet" / "model.onnx")
    assert list(unet_inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet_inputs["time_ids"] == ["batch", 6]
    index = json.loads((result.path / "model_index.json").read_text())
    assert "text_encoder_2" in index and "tokenizer_2" in index


def test_sdxl_generates_on_onnxruntime_what_pytorch_generates(sdxl_export):
    from diffusers import DDIMScheduler

    pipe, result = sdxl_export
    runner = OnnxTextToImage(result.path)
    prompts = ["a red house", "a dog in the style of van gogh"]
    latents = runner.initial_latents([0, 1], 8, 8)
    onnx_images = runner(prompts, latents=latents, steps=5, guidance=5.0)
    reference = copy.copy(pipe)
    reference.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    images = reference(prompt=prompts, latents=torch.from_numpy(latents), num_inference_steps=5,
                       guidance_scale=5.0, output_type="np").images
    torch_images = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert onnx_images.shape == (2, 64, 64, 3)
    assert np.abs(onnx_images.astype(int) - torch_images.astype(int)).max() <= 2


def test_diffusers_onnx_pipeline_loads_the_export_and_matches_pytorch(tmp_path):
    """diffusers' OnnxStableDiffusionPipeline, on the folder as written: it feeds int32 ids, reads
    vocab.json/merges.txt through CLIPTokenizer, and must draw what PyTorch draws."""
    from diffusers import OnnxStableDiffusionPipeline, StableDiffusionPipeline

    from compiler.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    export_onnx(pipe, tmp_path / "sd1", external_data_threshold_bytes=0)
    folder = tmp_path / "sd1"
    for name in ("vocab.json", "merges.txt"):
        assert (folder / "tokenizer" / name).stat().st_size > 100_000
    assert (folder / "unet" / "model.onnx_data").stat().st_mode & 0o777 == \
        (folder / "unet" / "model.onnx").stat().st_mode & 0o777 == 0o644 & ~_umask()
    text_encoder = onnx.load(str(folder / "text_encoder" / "model.onnx"), load_external_data=False)
    assert text_encoder.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    outputs = [o.name for o in text_encoder.graph.output]
    layers = pipe.text_encoder.config.num_hidden_layers
    assert outputs == ["last_hidden_state", "pooler_output", *(f"hidden_states.{i}" for i in range(layers + 1))]

    client = OnnxStableDiffusionPipeline.from_pretrained(str(folder), provider="CPUExecutionProvider")
    client.set_progress_bar_config(disable=True)
    prompts = ["a red house in the style of van gogh", "a dog"]
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    images = client(prompts, latents=latents, height=64, width=64, num_inference_steps=4,
                    guidance_scale=4.0, output_type="np").images
    reference = StableDiffusionPipeline(**pipe.components)
    reference.scheduler = type(client.scheduler).from_config(client.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(prompts, latents=torch.from_numpy(latents), height=64, width=64, num_inference_steps=4,
                         guidance_scale=4.0, output_type="np").images
    assert images.shape == expected.shape == (2, 64, 64, 3)
    assert np.abs(images - expected).max() * 255 < 0.5  # under half a pixel level
    assert np.abs(images - images[::-1]).max() * 255 > 10  # the prompts (and seeds) make different images


def test_sdxl_text_encoders_expose_hidden_states_and_pooled_first(sdxl_export):
    """optimum's SD-XL pipeline reads hidden_states.{N-1} and takes output 0 as the pooled
    embedding when it is 2-D."""
    pipe, result = sdxl_export
    for name, encoder, first in (("text_encoder", pipe.text_encoder, "last_hidden_state"),
                                 ("text_encoder_2", pipe.text_encoder_2, "text_embeds")):
        graph = onnx.load(str(result.path / name / "model.onnx"), load_external_data=False).graph
        names = [o.name for o in graph.output]
        assert names[0] == first
        assert names[2:] == [f"hidden_states.{i}" for i in range(encoder.config.num_hidden_layers + 1)]
        first_rank = len(graph.output[0].type.tensor_type.shape.dim)
        assert first_rank == (2 if name == "text_encoder_2" else 3)
    index = json.loads((result.path / "model_index.json").read_text())
    assert index["_class_name"] == "ORTStableDiffusionXLPipeline"
    assert (result.path / "tokenizer_2" / "merges.txt").is_file()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_generate_and_inspect_accept_an_onnx_folder(toy_onnx, toy_dir, tmp_path):
    """`editc generate --model ONNX_DIR` runs on onnxruntime from the same per-seed noise as the
    PyTorch model, so a seed draws the same picture; `editc inspect` describes the graphs."""
    from PIL import Image

    runner = CliRunner()
    for model, name in ((str(toy_onnx.path), "onnx.png"), (str(toy_dir), "torch.png")):
        result = runner.invoke(main, ["generate", "a red circle in the style of van gogh", "a blue square",
                                      "--seeds", "0-1", "--steps", "10", "--scale", "1", "--model", model,
                                      "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    onnx_image = np.asarray(Image.open(tmp_path / "onnx.png")).astype(int)
    torch_image = np.asarray(Image.open(tmp_path / "torch.png")).astype(int)
    assert onnx_image.shape == torch_image.shape == (64, 64, 3)
    assert np.abs(onnx_image - torch_image).max() <= 2 and onnx_image.std() > 20
    result = runner.invoke(main, ["inspect", str(toy_onnx.path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "onnx" and report["family"] == "sd1"
    assert report["components"]["text_encoder"]["inputs"] == {"input_ids": "int32"}
    assert report["components"]["unet"]["max_abs_error"] < 1e-4


def test_verify_runs_an_onnx_edited_model_but_wants_a_pytorch_base(toy_onnx, toy_dir):
    from compiler.errors import UserError
    from compiler.verify.run import load_pipeline

    loaded, info = load_pipeline(toy_onnx.path, "edited", "cpu")
    assert isinstance(loaded.pipeline, OnnxTextToImage) and info.family == "sd1" and len(info.sha256) == 64
    with pytest.raises(UserError, match="base model must be a PyTorch model"):
        load_pipeline(toy_onnx.path, "base", "cpu")


def test_onnx_of_a_compile_carries_the_weights_as_stored():
    """compile's ONNX is exported from the edited tensors rounded to the checkpoint's dtype, as
    its diffusers folder and single file store them, not from the float32 solve."""
    from compiler.export.onnx import weights_as_stored
    from compiler.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    name = "unet/down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    parameter = pipe.unet.get_parameter(name.split("/", 1)[1])
    solved = parameter.detach() + torch.randn_like(parameter) * 1e-3
    with torch.no_grad():
        parameter.copy_(solved)  # what fuse leaves in memory
    with weights_as_stored(pipe, {name: solved}, torch.float16):
        assert torch.equal(parameter, solved.half().float())
        assert not torch.equal(parameter, solved)
    assert torch.equal(parameter, solved)
    with weights_as_stored(pipe, {name: solved}, torch.float32):
        assert torch.equal(parameter, solved)
