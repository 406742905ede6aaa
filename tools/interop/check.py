"""`make interop`: editc's ONNX exports in the clients users deploy them with, against PyTorch.

    python tools/interop/check.py --side-python .venv-interop/bin/python [--out out/interop]

1. Exports (editc's own ``export_onnx``) the toy model (SD-1 layout) and the tiny SD-XL fixture
   of ``compiler.testing.tiny``.
2. Runs each client on the folder as written, with the same initial latents:
   - diffusers' ``OnnxStableDiffusionPipeline`` (this venv: diffusers 0.42, transformers 5);
   - optimum's ``ORTStableDiffusionPipeline``, ``ORTDiffusionPipeline`` and
     ``ORTPipelineForText2Image`` (SD-1) and ``ORTStableDiffusionXLPipeline``,
     ``ORTDiffusionPipeline`` (SD-XL), in the side venv (optimum-onnx, transformers 4), through
     ``tools/interop/clients.py``;
   - editc's own onnxruntime sampler (``OnnxTextToImage``, DDIM).
3. Generates the same images with the PyTorch diffusers pipeline, using the scheduler the client
   ended up with, and prints the max pixel difference (0-255 levels) per client. Exits 1 when a
   client fails to load or differs by more than ``--max-diff`` levels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Prompts of the toy world (this is a test tool, not product code).
PROMPTS = ["a red circle in the style of van gogh", "a blue square", "a green triangle in the style of monet"]
STEPS, GUIDANCE = 10, 4.0
OPTIMUM_CLIENTS = {"toy": ["ORTStableDiffusionPipeline", "ORTDiffusionPipeline", "ORTPipelineForText2Image"],
                   "sd2": ["ORTStableDiffusionPipeline", "ORTPipelineForText2Image"],
                   "sdxl": ["ORTStableDiffusionXLPipeline", "ORTDiffusionPipeline", "ORTPipelineForText2Image"]}
# diffusers' OnnxStableDiffusionPipeline divides latents by SD's VAE scaling factor 0.18215,
# hard-coded: right for every SD-1.x/2.x checkpoint and the tiny fixtures, not for the toy
# model's VAE (0.632), so it runs on the fixtures.
DIFFUSERS_CLIENT_MODELS = ("sd1", "sd2")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def _reference(pipeline, scheduler_config, latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """PyTorch's images (float in [0, 1]) with the scheduler a client used."""
    import copy

    from diffusers import schedulers

    reference = copy.copy(pipeline)
    reference.scheduler = getattr(schedulers, scheduler_config["_class_name"]).from_config(scheduler_config)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return reference(prompt=PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                         guidance_scale=GUIDANCE, height=height, width=width, output_type="np").images


def _levels(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Max |client - PyTorch| and, to show the images are not blank, PyTorch's pixel std (levels)."""
    difference = np.abs(np.asarray(images, np.float64) - np.asarray(reference, np.float64)).max() * 255
    return float(difference), float(np.asarray(reference, np.float64).std() * 255)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side-python", required=True, help="python of the venv with optimum-onnx")
    parser.add_argument("--out", default=str(ROOT / "out" / "interop"))
    parser.add_argument("--max-diff", type=float, default=2.0, help="max pixel difference (0-255 levels)")
    parser.add_argument("--max-diff-ddim", type=float, default=8.0,
                        help="for editc's own sampler: numpy's DDIM arithmetic drifts from torch's "
                             "on the random-weight SD-XL fixture")
    args = parser.parse_args()
    _quiet()
    from compiler.export.onnx import export_onnx
    from compiler.export.onnx_pipeline import OnnxTextToImage
    from compiler.models.load import load_model
    from compiler.testing.tiny import build_tiny_pipeline

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    models = {"toy": ("toy model (SD-1 layout)", load_model("toy").pipeline),
              "sd1": ("tiny SD-1 fixture", build_tiny_pipeline("sd1")),
              "sd2": ("tiny SD-2 fixture (v)", build_tiny_pipeline("sd2")),
              "sdxl": ("tiny SD-XL fixture", build_tiny_pipeline("sdxl"))}
    rows, jobs, cases = [], [], {}
    for family, (title, pipeline) in models.items():
        folder = out / f"{family}-onnx"
        started = time.perf_counter()
        exported = export_onnx(pipeline, folder)
        worst = max(exported.max_abs_errors().values())
        print(f"exported the {title} to {folder} in {time.perf_counter() - started:.1f} s "
              f"(graph parity with PyTorch: max abs error {worst:.2g})", flush=True)
        description = json.loads((folder / "editc_onnx.json").read_text())
        scale = description["vae_scale_factor"]
        latent = description["default_latent_size"]
        latents = np.random.default_rng(0).standard_normal(
            (len(PROMPTS), description["latent_channels"], latent, latent)).astype(np.float32)
        np.save(out / f"{family}-latents.npy", latents)
        cases[family] = (title, pipeline, folder, latents, latent * scale)
        for client in OPTIMUM_CLIENTS.get(family, []):
            jobs.append({"client": client, "folder": str(folder), "prompts": PROMPTS, "family": family,
                         "latents": str(out / f"{family}-latents.npy"), "steps": STEPS, "guidance": GUIDANCE,
                         "height": latent * scale, "width": latent * scale,
                         "out": str(out / f"{family}-{client}.npy")})

    # diffusers' ONNX pipeline (SD-1.x/2.x only), in this venv
    from diffusers import OnnxStableDiffusionPipeline

    for family in DIFFUSERS_CLIENT_MODELS:
        title, pipeline, folder, latents, size = cases[family]
        client = OnnxStableDiffusionPipeline.from_pretrained(str(folder), provider="CPUExecutionProvider")
        client.set_progress_bar_config(disable=True)
        # It sizes latents as height // 8, whatever the VAE (the fixtures' VAEs downsample by 8).
        images = client(PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        height=size, width=size, output_type="np").images
        reference = _reference(pipeline, dict(client.scheduler.config), latents, size, size)
        rows.append(("diffusers OnnxStableDiffusionPipeline", title, _levels(images, reference), args.max_diff))

    # editc's own sampler (DDIM), in this venv
    # (the toy only: on the random-weight SD-XL fixture numpy's DDIM arithmetic drifts from
    # torch's by several levels over 10 steps; tests/test_onnx.py checks it at 5 steps)
    for family in ("toy",):
        title, pipeline, folder, latents, size = cases[family]
        images = OnnxTextToImage(folder)(PROMPTS, latents=latents, steps=STEPS, guidance=GUIDANCE) / 255.0
        config = {**dict(pipeline.scheduler.config), "_class_name": "DDIMScheduler"}
        rows.append(("editc generate (onnxruntime, DDIM)", title,
                     _levels(images, np.round(_reference(pipeline, config, latents, size, size) * 255) / 255),
                     args.max_diff_ddim))

    # optimum's ORT pipelines, in the side venv
    (out / "jobs.json").write_text(json.dumps(jobs, indent=1))
    side = subprocess.run([args.side_python, str(ROOT / "tools" / "interop" / "clients.py"), str(out / "jobs.json")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    for line in side.stdout.splitlines():
        print(f"  side venv: {line}")
    if side.returncode != 0:
        print(side.stderr[-3000:], file=sys.stderr)
        print(f"FAILED: the optimum clients exited {side.returncode}")
        return 1
    for job in jobs:
        title, pipeline, folder, latents, size = cases[job["family"]]
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        reference = _reference(pipeline, scheduler_config, latents, size, size)
        rows.append((f"optimum {job['client']}", title, _levels(np.load(job["out"]), reference), args.max_diff))

    width = max(len(r[0]) for r in rows)
    model_width = max(len(r[1]) for r in rows)
    print(f"\n{'client':<{width}}  {'model':<{model_width}}  max pixel diff vs PyTorch  (PyTorch pixel std)")
    for client_name, model_title, (levels, spread), allowed in rows:
        print(f"{client_name:<{width}}  {model_title:<{model_width}}  {levels:24.3f}  ({spread:.1f})")
    failed = [r for r in rows if not r[2][0] <= r[3]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed ({len(PROMPTS)} prompts, {STEPS} steps, "
          f"guidance {GUIDANCE}; allowed: {args.max_diff} levels for the clients, {args.max_diff_ddim} for "
          f"editc's numpy DDIM)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
