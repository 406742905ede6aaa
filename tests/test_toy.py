"""The embedded toy world: the shipped model is a standard diffusers pipeline, the training
command is seeded and resumable, and `editc generate` draws from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from compiler.cli import main
from compiler.toy import world
from compiler.toy.render import render

WEIGHTS = Path(__file__).resolve().parents[1] / "compiler" / "toy" / "weights"


def _train_quick(workdir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # One thread, as the session's quick toy (conftest.py) was trained: the runs must agree bit for bit.
    return subprocess.run([sys.executable, "-m", "compiler.toy.train", "--quick", "--workdir", str(workdir),
                           "--out", str(out), *extra], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_shipped_toy_model_is_a_standard_pipeline_under_40_mb():
    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size < 40 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS / "pipeline"))
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 16  # SD-1.5's layout
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


@pytest.mark.slow  # 18 s: a second quick training from scratch (the toy is an instrument, not the product)
def test_training_is_seeded_and_resumable(quick_toy_weights, tmp_path):
    # A second run from scratch gives the session's quick toy (conftest.py) bit for bit.
    again = _train_quick(tmp_path / "b", tmp_path / "b-out")
    assert "stages data, clip, vae, unet, refine, export" in again.stdout
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(quick_toy_weights / unet), load_file(tmp_path / "b-out" / unet)
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    # A finished stage is skipped: re-running the UNet stages trains nothing and changes nothing.
    done = tmp_path / "b" / "refine.done.pt"
    before = done.stat().st_mtime_ns
    _train_quick(tmp_path / "b", tmp_path / "b-out2", "--stage", "refine")
    assert done.stat().st_mtime_ns == before


def test_renderer_is_deterministic_and_styles_differ():
    scene = world.Scene("star", "red", "van gogh")
    assert np.array_equal(render(scene, 3), render(scene, 3))
    plain = render(world.Scene("star", "red", None), 3)
    assert np.abs(render(scene, 3).astype(float) - plain.astype(float)).mean() > 10


@pytest.mark.skipif(not (WEIGHTS / "pipeline" / "unet").is_dir(), reason="toy weights not shipped")
def test_generate_draws_the_prompted_object(tmp_path):
    from PIL import Image

    from compiler.toy.judge import load_judge

    out = tmp_path / "img.png"
    result = CliRunner().invoke(main, ["generate", "a red circle", "--seed", "0", "--steps", "20", "--scale", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = np.array(Image.open(out).convert("RGB"))
    got = load_judge().classify(image[None])[0]
    assert (got.identity, got.colour) == ("circle", "red")
