"""Text-to-image generation with fixed seeds, batched: shared by generate, locate and verify."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], *, steps: int = 25, guidance: float = 4.0,
                    batch: int = 64, height: int | None = None, width: int | None = None,
                    progress: bool = True, desc: str = "generate") -> np.ndarray:
    """One image per (prompt, seed) pair, as uint8 (N, H, W, 3).

    Each image's initial noise depends only on its seed, so the same pair gives the same image
    in any batch, and base and edited models can be compared image by image.
    """
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must pair up")
    from compiler.export.onnx_pipeline import OnnxTextToImage

    if isinstance(pipe, OnnxTextToImage):
        return _generate_onnx(pipe, prompts, seeds, steps=steps, guidance=guidance, batch=batch,
                              height=height, width=width)
    out = []
    starts = range(0, len(prompts), batch)
    for i in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch]]
        result = pipe(prompt=list(prompts[i : i + batch]), generator=generators, num_inference_steps=steps,
                      guidance_scale=guidance, height=height, width=width, output_type="np")
        out.append((np.clip(result.images, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def _generate_onnx(runner, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                   batch: int, height: int | None, width: int | None) -> np.ndarray:
    """The same pairs on onnxruntime, from the initial noise a diffusers pipeline draws for each
    seed (one CPU generator per image), so a seed means the same picture in both runtimes."""
    description = runner.description
    scale = description["vae_scale_factor"]
    size = description["default_latent_size"]
    shape = (description["latent_channels"], (height // scale) if height else size, (width // scale) if width else size)
    latents = np.stack([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s)))[0].numpy()
                        for s in seeds])
    if not len(prompts):
        return np.zeros((0, 0, 0, 3), np.uint8)
    return runner(list(prompts), latents=latents, steps=steps, guidance=guidance, batch=batch)


def load_generator(path_or_toy: str, device=None):
    """What ``generate`` draws with: an ``export_onnx`` folder runs on onnxruntime
    (``OnnxTextToImage``; its CUDA provider when ``device`` is a GPU and onnxruntime-gpu is
    installed), anything else loads as a diffusers pipeline as the device policy says
    (``compiler.device``: float32 on the CPU, the stored half precision on a GPU)."""
    from compiler.device import resolve_device
    from compiler.export.onnx_pipeline import OnnxTextToImage, is_onnx_folder, providers_for

    device = resolve_device(device)
    if is_onnx_folder(path_or_toy):
        return OnnxTextToImage(path_or_toy, providers=providers_for(device))
    from compiler.models.load import load_for_generation

    return load_for_generation(path_or_toy, device=device).pipeline


def image_grid(images: np.ndarray, cols: int, scale: int = 1) -> np.ndarray:
    """Tile (N, H, W, 3) images into one picture, ``cols`` per row."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * h, cols * w, c), 255, np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid
