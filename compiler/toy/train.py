"""Train the toy world's models from scratch: reproducible, resumable, on CPU.

    python -m compiler.toy.train --workdir .toy-train --out compiler/toy/weights

Stages, in order (each resumes from its last checkpoint in --workdir; a finished stage is
skipped): ``data`` renders the training and held-out sets; ``clip`` trains a transformers
CLIPModel contrastively (its text tower becomes the frozen text encoder, the whole model the
judge); ``vae`` trains an AutoencoderKL; ``unet`` trains a UNet2DConditionModel with SD-1.5's
block layout on the VAE's latents and the frozen text encoder's 77-token states, epsilon
objective, SD's scaled-linear schedule; ``refine`` runs a second cosine cycle from those weights
and keeps an EMA of them; ``export`` writes a diffusers StableDiffusionPipeline
folder and the judge's folder in fp16. Like nanoGPT: one readable loop per model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from compiler.toy import world
from compiler.toy.render import SIZE, render

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "clip"
STAGES = ("data", "clip", "vae", "unet", "refine", "export")


@dataclass
class ToyConfig:
    seed: int = 0
    n_train: int = 60_000
    n_heldout: int = 4_000
    # CLIP: text tower 128 wide (the UNet's context dim), ViT judge 96 wide, patch 4.
    text_width: int = 128
    text_layers: int = 4
    vision_width: int = 96
    vision_layers: int = 4
    clip_steps: int = 1_200
    clip_batch: int = 128
    clip_lr: float = 1e-3
    # AutoencoderKL: 32x32x3 -> 8x8x4.
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_steps: int = 1_200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    # UNet with SD-1.5's layout: 3 cross-attention down blocks, mid, 3 up: 16 attn2 layers.
    unet_channels: tuple[int, ...] = (64, 96, 96, 128)
    unet_steps: int = 2_400
    unet_batch: int = 64
    unet_lr: float = 3e-4
    # Second cycle from the first's weights, fresh optimizer, EMA of the weights exported.
    refine_steps: int = 1_800
    refine_lr: float = 2e-4
    ema_decay: float = 0.998
    uncond_prob: float = 0.1  # caption dropout for classifier-free guidance
    checkpoint_every: int = 250
    threads: int = 0  # 0: torch's default

    @classmethod
    def quick(cls) -> "ToyConfig":
        """A few steps of everything: for tests of the training code, not for use."""
        return cls(n_train=128, n_heldout=32, clip_steps=3, clip_batch=16, vae_steps=3,
                   vae_batch=8, unet_steps=3, unet_batch=8, refine_steps=2,
                   checkpoint_every=2)


# ----------------------------------------------------------------------------- data
def render_split(n: int, seed: int, prefixes: tuple[str, ...]) -> dict:
    rng = random.Random(seed)
    samples = [world.sample(rng, prefixes) for _ in range(n)]
    images = np.stack([render(s.scene, seed * 10_000_019 + i) for i, s in enumerate(samples)])
    return {
        "images": images,
        "texts": [s.text for s in samples],
        "scenes": [[s.scene.identity, s.scene.colour, s.scene.style] for s in samples],
        "says_colour": [s.says_colour for s in samples],
    }


def save_split(split: dict, path: Path) -> None:
    np.save(path.with_suffix(".npy"), split["images"])
    meta = {k: v for k, v in split.items() if k != "images"}
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_split(path: Path) -> dict:
    split = json.loads(path.with_suffix(".json").read_text())
    split["images"] = np.load(path.with_suffix(".npy"))
    split["samples"] = [
        world.Sample(world.Scene(*sc), t, sc_)
        for sc, t, sc_ in zip(split["scenes"], split["texts"], split["says_colour"])
    ]
    return split


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the VAE's and the judge's input range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------- models
def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def make_clip(cfg: ToyConfig):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=49408, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
                hidden_act="quick_gelu", projection_dim=128, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=4, image_size=SIZE,
                  patch_size=4, hidden_act="quick_gelu", projection_dim=128)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=128))


def make_vae(cfg: ToyConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=SIZE)


def make_unet(cfg: ToyConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 2 ** (len(cfg.vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2, cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=32,
    )


def make_noise_schedule():
    """SD-1.5's training schedule (scaled linear, 1000 steps) and its DDIM sampler."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ddpm = DDPMScheduler(**common, clip_sample=False)
    ddim = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return ddpm, ddim


def text_encoder_from_clip(clip):
    """A standalone CLIPTextModel holding the CLIP model's text tower (the UNet's encoder)."""
    from transformers import CLIPTextModel

    import copy

    # A copy: casting the pipeline to fp16 later must not change the judge's saved config.
    encoder = CLIPTextModel(copy.deepcopy(clip.config.text_config))
    source = clip.text_model.state_dict()
    target_keys = set(encoder.state_dict())
    prefix = "text_model." if any(k.startswith("text_model.") for k in target_keys) else ""
    encoder.load_state_dict({prefix + k: v for k, v in source.items()})
    return encoder.eval()


# ----------------------------------------------------------------------------- loops
class Checkpointer:
    """Resumable training state for one stage: model, optimizer, step, RNG."""

    def __init__(self, workdir: Path, stage: str):
        self.path = workdir / f"{stage}.ckpt.pt"
        self.done = workdir / f"{stage}.done.pt"

    def load(self, model, opt, extra: dict | None = None) -> int:
        """Restore the last checkpoint (``extra``: more modules by name, e.g. an EMA copy)."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        for name, module in (extra or {}).items():
            module.load_state_dict(state[name])
        torch.set_rng_state(state["torch_rng"])
        return state["step"]

    def save(self, model, opt, step: int, extra: dict | None = None) -> None:
        tmp = self.path.with_suffix(".tmp")
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                 "torch_rng": torch.get_rng_state()}
        state.update({name: module.state_dict() for name, module in (extra or {}).items()})
        torch.save(state, tmp)
        tmp.replace(self.path)

    def finish(self, model) -> None:
        tmp = self.done.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(self.done)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(model, opt, loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at learning rate ``lr`` with the gradient norm clipped to 1."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The batch of a step depends only on (seed, step): resuming replays the same data."""
    return np.random.default_rng([seed, step]).integers(0, n, batch)


def train_clip(cfg: ToyConfig, workdir: Path, data: dict) -> None:
    ck = Checkpointer(workdir, "clip")
    if ck.done.exists():
        return
    torch.manual_seed(cfg.seed)
    clip, tok = make_clip(cfg), make_tokenizer()
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    start = ck.load(clip, opt)
    samples, images = data["samples"], data["images"]
    clip.train()
    bar = tqdm(range(start, cfg.clip_steps), desc="clip", initial=start, total=cfg.clip_steps)
    for step in bar:
        idx = batch_indices(cfg.seed + 1, step, len(samples), cfg.clip_batch)
        batch = [samples[i] for i in idx]
        enc = tok([s.text for s in batch], padding=True, return_tensors="pt")
        pixels = to_pixels(images[idx])
        out = clip(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels)
        # Positives are every caption that truthfully describes the image, not only its own.
        match = torch.tensor([[world.caption_matches(a, b.scene) for a in batch] for b in batch], dtype=torch.float32)
        logits = out.logits_per_image  # (images, texts)
        loss = 0.5 * (-(F.log_softmax(logits, 1) * match / match.sum(1, keepdim=True)).sum(1).mean()
                      - (F.log_softmax(logits, 0) * match / match.sum(0, keepdim=True)).sum(0).mean())
        optimizer_step(clip, opt, loss, lr_at(step, cfg.clip_steps, cfg.clip_lr))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            ck.save(clip, opt, step + 1)
    ck.finish(clip)


def train_vae(cfg: ToyConfig, workdir: Path, data: dict) -> None:
    ck = Checkpointer(workdir, "vae")
    if ck.done.exists():
        return
    torch.manual_seed(cfg.seed + 2)
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = ck.load(vae, opt)
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps)
    for step in bar:
        x = to_pixels(data["images"][batch_indices(cfg.seed + 2, step, len(data["images"]), cfg.vae_batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer_step(vae, opt, loss, lr_at(step, cfg.vae_steps, cfg.vae_lr))
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            ck.save(vae, opt, step + 1)
    ck.finish(vae)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    out = [vae.encode(to_pixels(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out)


class UNetData:
    """Latents of the training images and their captions' 77-token ids (plus the empty prompt)."""

    def __init__(self, cfg: ToyConfig, workdir: Path, data: dict):
        clip, vae = make_clip(cfg), make_vae(cfg)
        clip.load_state_dict(torch.load(workdir / "clip.done.pt"))
        vae.load_state_dict(torch.load(workdir / "vae.done.pt"))
        self.encoder, tok = text_encoder_from_clip(clip), make_tokenizer()
        latents_path = workdir / "latents.pt"
        if not latents_path.exists():
            vae.eval()
            latents = encode_latents(vae, data["images"])
            torch.save({"latents": latents, "scaling_factor": float(1.0 / latents.std())}, latents_path)
        saved = torch.load(latents_path)
        self.latents = saved["latents"] * saved["scaling_factor"]
        # The pipeline pads every prompt to 77 tokens and gives the UNet all 77 states: so do we.
        ids = tok(data["texts"] + [""], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        self.empty_ids, self.ids = ids[-1:], ids[:-1]


def unet_loss(cfg: ToyConfig, unet, data: UNetData, alphas: torch.Tensor, seed: int, step: int):
    """Epsilon-prediction loss on one batch; the batch, noise and caption dropout depend only
    on (seed, step), so a resumed run replays exactly the same data."""
    rng = np.random.default_rng([seed, step])
    idx = rng.integers(0, len(data.latents), cfg.unet_batch)
    batch_ids = data.ids[idx].clone()
    drop = torch.from_numpy(rng.random(cfg.unet_batch) < cfg.uncond_prob)
    batch_ids[drop] = data.empty_ids
    with torch.no_grad():
        context = data.encoder(batch_ids).last_hidden_state
    x0 = data.latents[idx]
    t = torch.from_numpy(rng.integers(0, 1000, cfg.unet_batch))
    noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(xt, t, encoder_hidden_states=context).sample, noise)


def train_unet(cfg: ToyConfig, workdir: Path, data: dict) -> None:
    ck = Checkpointer(workdir, "unet")
    if ck.done.exists():
        return
    udata = UNetData(cfg, workdir, data)
    torch.manual_seed(cfg.seed + 3)
    unet = make_unet(cfg)
    ddpm, _ = make_noise_schedule()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    start = ck.load(unet, opt)
    unet.train()
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", initial=start, total=cfg.unet_steps)
    for step in bar:
        loss = unet_loss(cfg, unet, udata, ddpm.alphas_cumprod, cfg.seed + 3, step)
        optimizer_step(unet, opt, loss, lr_at(step, cfg.unet_steps, cfg.unet_lr, warmup=200))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            ck.save(unet, opt, step + 1)
    ck.finish(unet)


def refine_unet(cfg: ToyConfig, workdir: Path, data: dict) -> None:
    """A second cosine cycle (a warm restart, SGDR) from the ``unet`` stage's weights with a
    fresh optimizer, keeping an exponential moving average of the weights (as diffusers'
    train_text_to_image --use_ema does); the EMA weights are what ``export`` ships. Sharper
    shapes under busy painting-style backgrounds came from this stage."""
    ck = Checkpointer(workdir, "refine")
    if ck.done.exists():
        return
    udata = UNetData(cfg, workdir, data)
    unet = make_unet(cfg)
    unet.load_state_dict(torch.load(workdir / "unet.done.pt"))
    ema = make_unet(cfg)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    ddpm, _ = make_noise_schedule()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.refine_lr, weight_decay=0.01)
    start = ck.load(unet, opt, extra={"ema": ema})
    unet.train()
    bar = tqdm(range(start, cfg.refine_steps), desc="refine", initial=start, total=cfg.refine_steps)
    for step in bar:
        # Steps of this cycle draw new batches: seeds differ from the first cycle's.
        loss = unet_loss(cfg, unet, udata, ddpm.alphas_cumprod, cfg.seed + 4, step)
        optimizer_step(unet, opt, loss, lr_at(step, cfg.refine_steps, cfg.refine_lr, warmup=100))
        with torch.no_grad():
            for e, w in zip(ema.parameters(), unet.parameters()):
                e.lerp_(w, 1.0 - cfg.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            ck.save(unet, opt, step + 1, extra={"ema": ema})
    ck.finish(ema)


# ----------------------------------------------------------------------------- export
def export(cfg: ToyConfig, workdir: Path, out: Path) -> None:
    """Write ``out/pipeline`` (a StableDiffusionPipeline folder) and ``out/judge`` in fp16.

    The judge folder holds only the vision tower, the projections and the logit scale: its text
    tower is the pipeline's text encoder, which is not stored twice (``judge.load_judge`` joins
    them).
    """
    import shutil

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    clip, vae, unet = make_clip(cfg), make_vae(cfg), make_unet(cfg)
    clip.load_state_dict(torch.load(workdir / "clip.done.pt"))
    vae.load_state_dict(torch.load(workdir / "vae.done.pt"))
    unet.load_state_dict(torch.load(workdir / "refine.done.pt"))
    vae.register_to_config(scaling_factor=torch.load(workdir / "latents.pt")["scaling_factor"])
    _, ddim = make_noise_schedule()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder_from_clip(clip), tokenizer=make_tokenizer(),
                                   unet=unet, scheduler=ddim, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp / "pipeline", safe_serialization=True)
    from compiler.export.onnx import save_tokenizer

    save_tokenizer(pipe.tokenizer, tmp / "pipeline" / "tokenizer")  # + vocab.json, merges.txt (transformers 4)
    judge_dir = tmp / "judge"
    judge_dir.mkdir(parents=True)
    clip.config.save_pretrained(judge_dir)
    judge_state = {k: v.to(torch.float16).contiguous() for k, v in clip.state_dict().items() if not k.startswith("text_model.")}
    save_file(judge_state, judge_dir / "vision.safetensors", metadata={"format": "pt"})
    (judge_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": SIZE},
        "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "resample": 3}, indent=2))
    (tmp / "toy_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    from compiler.toy.vocabulary import write_vocabulary

    write_vocabulary(tmp)  # the model brings its own words (compiler.prompts)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(".toy-train"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    parser.add_argument("--stage", choices=("all",) + STAGES, default="all")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (tests)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = ToyConfig.quick() if args.quick else ToyConfig()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stages = STAGES if args.stage == "all" else (args.stage,)
    t0 = time.time()
    train_path, held_path = args.workdir / "train", args.workdir / "heldout"
    if "data" in stages and not train_path.with_suffix(".json").exists():
        save_split(render_split(cfg.n_heldout, cfg.seed + 7, world.HELDOUT_PREFIXES), held_path)
        save_split(render_split(cfg.n_train, cfg.seed, world.TRAIN_PREFIXES), train_path)
    data = load_split(train_path) if any(s in stages for s in ("clip", "vae", "unet", "refine")) else None
    if "clip" in stages:
        train_clip(cfg, args.workdir, data)
    if "vae" in stages:
        train_vae(cfg, args.workdir, data)
    if "unet" in stages:
        train_unet(cfg, args.workdir, data)
    if "refine" in stages:
        refine_unet(cfg, args.workdir, data)
    if "export" in stages:
        export(cfg, args.workdir, args.out)
    print(f"stages {', '.join(stages)} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
