"""The device and dtype policy (``compiler.device``): one place decides where each stage runs.

Every test here says its device. The CPU ones run everywhere; the ``gpu`` ones need CUDA and
are skipped without it (``make gpu-check`` runs them on a GPU machine)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from compiler.device import DevicePolicy, compute_tag, device_policy, resolve_device
from compiler.errors import UserError

CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# The policy (CPU)
# --------------------------------------------------------------------------------------------


def test_device_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.setenv("EDITC_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("EDITC_DEVICE")
    assert resolve_device(None) == torch.device("cuda" if CUDA else "cpu")  # the default


@pytest.mark.parametrize("text, message", [("gpu0", "not a device"), ("cuda:99", "GPU"), ("xla", "not supported")])
def test_a_device_this_machine_lacks_is_bad_input_naming_the_flag(text, message):
    with pytest.raises(UserError, match=message) as caught:
        resolve_device(text)
    assert str(caught.value).startswith("--device")


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_cuda_on_a_machine_without_a_gpu_exits_2_with_one_line(tmp_path):
    from compiler.cli import main

    result = CliRunner().invoke(main, ["compile", "recipes/van_gogh.yaml", "--device", "cuda",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--device cpu" in lines[0]
    assert not (tmp_path / "out").exists()


def test_generation_runs_in_the_stored_half_precision_on_a_gpu_and_float32_on_the_cpu():
    cpu, gpu = DevicePolicy(torch.device("cpu")), DevicePolicy(torch.device("cuda"))
    assert cpu.generation_dtype(torch.float16) == torch.float32  # the CPU record is float32
    assert gpu.generation_dtype(torch.float16) == torch.float16
    assert gpu.generation_dtype(torch.bfloat16) == torch.bfloat16
    assert gpu.generation_dtype(torch.float32) == torch.float32  # a float32 checkpoint stays
    assert (cpu.embed_dtype, cpu.solve_dtype) == (gpu.embed_dtype, gpu.solve_dtype) == (torch.float32, torch.float64)
    assert cpu.generation_batch(32) == 32


def test_caches_name_where_their_content_was_computed():
    assert compute_tag("cpu") == "cpu"
    assert compute_tag("cpu", torch.float16) == "cpu/float16"
    if CUDA:
        assert compute_tag("cuda").startswith("cuda/") and compute_tag("cuda") != compute_tag("cpu")


def test_the_manifest_records_device_dtypes_and_import_time(quick_toy, tmp_path):
    from compiler.compile import compile_to_disk
    from compiler.recipe import loads_recipe

    recipe = loads_recipe("edits:\n  - {concept: van gogh, replacement: a painting, attribute: style, layers: [2, 3]}\n"
                          "outputs: {formats: [delta]}\n", "vg.yaml")
    manifest = compile_to_disk(recipe, model=str(quick_toy), out=tmp_path / "out", progress=False,
                               verify=False, device="cpu")
    assert manifest["compute"] == {**manifest["compute"], "device": "cpu", "gpu": None, "embed_dtype": "float32",
                                   "solve_dtype": "float64", "generation_dtype": "float32"}
    timings = manifest["timings_seconds"]
    assert {"imports", "load", "embed", "solve", "save"} <= set(timings)
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["compute"]["device"] == "cpu"


# --------------------------------------------------------------------------------------------
# torchrun: more ranks than GPUs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def one_fake_gpu(monkeypatch):
    """torch believes it has one GPU; process-group joins are recorded, not made."""
    import torch.distributed as dist

    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(("backend", backend)))
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("EDITC_DEVICE", raising=False)
    return joined


def test_two_ranks_on_one_gpu_fall_back_to_gloo_on_the_cpu(one_fake_gpu):
    from compiler.locate.distributed import init_from_environment

    assert init_from_environment(None) == torch.device("cpu")
    assert one_fake_gpu == [("backend", "gloo")]


def test_two_ranks_on_one_gpu_asked_for_cuda_is_bad_input_saying_how_many_gpus(one_fake_gpu):
    from compiler.locate.distributed import init_from_environment

    with pytest.raises(UserError, match=r"2 processes .* sees 1 GPU.*--nproc-per-node 1"):
        init_from_environment("cuda")
    assert one_fake_gpu == []


# --------------------------------------------------------------------------------------------
# Judges and cached sweeps
# --------------------------------------------------------------------------------------------


def test_the_toy_judge_on_a_model_not_from_the_toy_world_exits_2_saying_what_to_pass(tiny, tmp_path):
    from compiler.cli import main
    from compiler.models.load import TOY_PIPELINE

    result = CliRunner().invoke(main, ["locate", "--model", str(tiny("sd1")), "--concept", "van gogh",
                                       "--replacement", "a painting", "--attribute", "style",
                                       "--judge", str(TOY_PIPELINE.parent / "judge"), "--steps", "1",
                                       "--out", str(tmp_path / "loc")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "fits only toy-world models" in lines[0] and "--judge DIR" in lines[0]


def test_compile_uses_only_the_sweep_it_would_run_not_an_earlier_one(quick_toy, monkeypatch, tmp_path):
    """An earlier sweep of the same concept with other settings sits in the cache; compile's
    locate must not take it (two machines would write different checkpoints)."""
    from compiler.locate import cache, locogen
    from compiler.models.selective import open_model

    loaded = open_model(str(quick_toy), device="cpu")
    stale = cache.entry_dir("locate", loaded.model_hash, "van-gogh.style", "0" * 64)
    stale.mkdir(parents=True)
    (stale / "locate.json").write_text(json.dumps({"replacement": "a painting", "schema_version": locogen.SCHEMA_VERSION,
                                                   "best_start": 7, "best_size": 1}))
    ran = []
    monkeypatch.setattr(locogen, "locate", lambda pipe, *args, **kwargs: ran.append(args) or "swept")
    assert locogen.locate_cached(loaded, "van gogh", "a painting", "style", judge=object(), progress=False) == "swept"
    assert ran and ran[0][3] == locogen.COMPILE_SWEEP


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


def _compile_delta(model, out, device, cache_dir, monkeypatch):
    from safetensors.torch import load_file

    from compiler.compile import compile_to_disk
    from compiler.recipe import loads_recipe

    monkeypatch.setenv("EDITC_CACHE_DIR", str(cache_dir))
    recipe = loads_recipe("preserve: [monet]\nedits:\n  - {concept: van gogh, replacement: a painting, "
                          "attribute: style, layers: [2, 3, 4]}\noutputs: {formats: [delta]}\n", "vg.yaml")
    manifest = compile_to_disk(recipe, model=str(model), out=out, progress=False, verify=False, device=device)
    delta = next(out.glob("*.safetensors"))
    return manifest, load_file(str(delta))


@pytest.mark.gpu
def test_gpu_compile_agrees_with_the_cpu_and_with_itself_bit_for_bit(quick_toy, tmp_path, monkeypatch):
    cpu_manifest, cpu = _compile_delta(quick_toy, tmp_path / "cpu", "cpu", tmp_path / "c0", monkeypatch)
    gpu_manifest, gpu = _compile_delta(quick_toy, tmp_path / "gpu", "cuda", tmp_path / "c1", monkeypatch)
    _, again = _compile_delta(quick_toy, tmp_path / "gpu2", "cuda", tmp_path / "c2", monkeypatch)
    assert gpu_manifest["compute"]["device"].startswith("cuda") and gpu_manifest["compute"]["gpu"]
    assert cpu_manifest["compute"]["device"] == "cpu"
    assert sorted(cpu) == sorted(gpu) == sorted(again)
    for name in cpu:
        scale = cpu[name].float().norm()
        assert (gpu[name].float() - cpu[name].float()).norm() <= 1e-3 * scale, name
        assert torch.equal(gpu[name], again[name]), name  # run to run on one GPU


@pytest.mark.gpu
def test_gpu_generation_uses_the_stored_half_precision(tiny):
    from compiler.models.load import load_for_generation

    loaded = load_for_generation(str(tiny("sd1")), device="cuda")
    assert loaded.pipeline.unet.device.type == "cuda"
    assert loaded.pipeline.unet.dtype == loaded.policy.generation_dtype(loaded.stored_dtype)
