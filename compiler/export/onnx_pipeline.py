"""Text-to-image on onnxruntime alone: an exported folder, numpy, and nothing from torch.

``OnnxTextToImage(folder)`` reads what ``export_onnx`` wrote (``editc_onnx.json``, the scheduler
config, the tokenizer files) and generates images of an SD-1, SD-2 or SD-XL model with
deterministic DDIM (η = 0) and classifier-free guidance, in numpy, conditioning exactly as the
diffusers pipelines do (SD-XL: both encoders' penultimate states concatenated, the pooled
projection of the second, size/crop ``time_ids``, zero unconditional embeddings).

The DDIM schedule is what diffusers' ``DDIMScheduler.from_config(config)`` computes from the
scheduler config, whatever scheduler class the config names (DDIM is a valid sampler for any
model trained on those betas), including DDIMScheduler's defaults for keys the config lacks
(``clip_sample`` and ``set_alpha_to_one`` true, ``steps_offset`` 0). Tokenization uses the
exported tokenizer files (``transformers``' CLIP tokenizer, which needs no torch).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.errors import UserError
from compiler.export.onnx import ort_session

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass
class DDIMSchedule:
    """Deterministic DDIM (η = 0) from a diffusers scheduler config, in numpy."""

    alphas_cumprod: np.ndarray  # float32, one per training timestep
    final_alpha_cumprod: float
    num_train_timesteps: int
    steps_offset: int
    timestep_spacing: str
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float

    @classmethod
    def from_config(cls, config: dict) -> DDIMSchedule:
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        schedule = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float32)
        elif schedule == "linear":
            betas = np.linspace(start, end, n, dtype=np.float32)
        elif schedule == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
        else:
            raise UserError(f"scheduler config: beta_schedule '{schedule}' is not supported by the "
                            f"onnxruntime sampler; valid: linear, scaled_linear, trained_betas")
        if config.get("rescale_betas_zero_snr") or config.get("thresholding"):
            raise UserError("scheduler config: rescale_betas_zero_snr and thresholding are not "
                            "supported by the onnxruntime sampler")
        alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
        set_alpha_to_one = config.get("set_alpha_to_one", True)
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"scheduler config: prediction_type '{prediction}' is not supported")
        return cls(alphas_cumprod, 1.0 if set_alpha_to_one else float(alphas_cumprod[0]), n,
                   int(config.get("steps_offset", 0)), config.get("timestep_spacing", "leading"),
                   prediction, bool(config.get("clip_sample", True)),
                   float(config.get("clip_sample_range", 1.0)))

    def timesteps(self, steps: int) -> np.ndarray:
        """The inference timesteps, as diffusers' DDIMScheduler.set_timesteps makes them."""
        n = self.num_train_timesteps
        if self.timestep_spacing == "leading":
            ratio = n // steps
            return (np.arange(steps) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
        if self.timestep_spacing == "trailing":
            return (np.round(np.arange(n, 0, -n / steps)) - 1).astype(np.int64)
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        raise UserError(f"scheduler config: timestep_spacing '{self.timestep_spacing}' is not "
                        f"supported; valid: leading, trailing, linspace")

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, steps: int) -> np.ndarray:
        previous = timestep - self.num_train_timesteps // steps
        alpha = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        beta = 1 - alpha
        if self.prediction_type == "epsilon":
            original = (sample - beta**0.5 * model_output) / alpha**0.5
            epsilon = model_output
        elif self.prediction_type == "sample":
            original = model_output
            epsilon = (sample - alpha**0.5 * original) / beta**0.5
        else:  # v_prediction
            original = alpha**0.5 * sample - beta**0.5 * model_output
            epsilon = alpha**0.5 * model_output + beta**0.5 * sample
        if self.clip_sample:
            original = np.clip(original, -self.clip_sample_range, self.clip_sample_range)
        return (alpha_prev**0.5 * original + (1 - alpha_prev) ** 0.5 * epsilon).astype(np.float32)


def _token_ids(tokenizer, prompts: list[str], dtype=np.int64) -> np.ndarray:
    length = min(int(tokenizer.model_max_length), 77)
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="np").input_ids.astype(dtype)


class _TextEncoder:
    """One text encoder's session and the names of what SD-1/2 and SD-XL read from it: the last
    hidden state, the penultimate one and the pooled output (editc's own names before format 2,
    optimum's since)."""

    def __init__(self, session):
        self.session = session
        self.ids_type = _NUMPY_TYPES[session.get_inputs()[0].type]
        names = [o.name for o in session.get_outputs()]
        if "penultimate_hidden_state" in names:  # format 1
            self.penultimate, self.pooled = "penultimate_hidden_state", "pooled_output"
        else:
            self.penultimate = [n for n in names if n.startswith("hidden_states.")][-2]
            self.pooled = "text_embeds" if "text_embeds" in names else "pooler_output"

    def run(self, outputs: list[str], ids: np.ndarray) -> list[np.ndarray]:
        return self.session.run(outputs, {"input_ids": ids.astype(self.ids_type)})


def is_onnx_folder(path: str | os.PathLike) -> bool:
    """An ``export_onnx`` folder (what generate, verify and inspect run on onnxruntime)."""
    return Path(path).is_dir() and (Path(path) / "editc_onnx.json").is_file()


def default_providers() -> tuple[str, ...]:
    """CUDA first when this onnxruntime has it (onnxruntime-gpu), then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available)


def providers_for(device) -> tuple[str, ...]:
    """onnxruntime's execution providers for a torch device: the CPU's alone on the CPU, else
    :func:`default_providers` (CUDA first when onnxruntime-gpu is installed)."""
    import torch

    return ("CPUExecutionProvider",) if torch.device(device).type == "cpu" else default_providers()


class OnnxTextToImage:
    """Generate images from an ``export_onnx`` folder on onnxruntime."""

    def __init__(self, folder: str | os.PathLike, providers: tuple[str, ...] | None = None):
        from transformers import CLIPTokenizer

        providers = providers or default_providers()
        self.providers = providers
        self.folder = Path(folder)
        description_file = self.folder / "editc_onnx.json"
        if not description_file.is_file():
            raise UserError(f"{self.folder}: not an editc ONNX export (no editc_onnx.json)")
        self.description = json.loads(description_file.read_text())
        self.family = self.description["family"]
        from compiler.models.families import FAMILIES

        if self.family not in FAMILIES:
            raise UserError(f"{self.folder}: exported from a {self.family} model, a family this editc does not know")
        self.rules = FAMILIES[self.family]
        scheduler_config = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text())
        self.schedule = DDIMSchedule.from_config(scheduler_config)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.folder / "tokenizer"))
        self.text_encoder = _TextEncoder(ort_session(self.folder / "text_encoder" / "model.onnx", providers))
        if self.rules.joins_text_encoders:
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(str(self.folder / "tokenizer_2"))
            self.text_encoder_2 = _TextEncoder(ort_session(self.folder / "text_encoder_2" / "model.onnx", providers))
        self.unet = ort_session(self.folder / "unet" / "model.onnx", providers)
        self.vae_decoder = ort_session(self.folder / "vae_decoder" / "model.onnx", providers)
        self._unet_types = {i.name: _NUMPY_TYPES[i.type] for i in self.unet.get_inputs()}
        self._decoder_type = _NUMPY_TYPES[self.vae_decoder.get_inputs()[0].type]

    def content_hash(self) -> str:
        """SHA-256 over the folder's files (``compiler.models.hashing.folder_sha256``)."""
        from compiler.models.hashing import folder_sha256

        return folder_sha256(self.folder, sorted(p for p in self.folder.rglob("*") if p.is_file()))

    def set_progress_bar_config(self, **_) -> None:
        """Accepted for the diffusers pipelines' interface; this sampler shows no progress bar."""

    def encode_prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """The UNet's context for each prompt and, for SD-XL, the pooled text embedding."""
        ids = _token_ids(self.tokenizer, prompts)
        if not self.rules.joins_text_encoders:
            return self.text_encoder.run(["last_hidden_state"], ids)[0], None
        first = self.text_encoder.run([self.text_encoder.penultimate], ids)[0]
        second_encoder = self.text_encoder_2
        second, pooled = second_encoder.run([second_encoder.penultimate, second_encoder.pooled],
                                            _token_ids(self.tokenizer_2, prompts))
        return np.concatenate([first, second], axis=-1), pooled

    def _conditioning(self, prompts: list[str], height: int, width: int) -> dict[str, np.ndarray]:
        """UNet inputs besides sample and timestep for [unconditional…, conditional…]."""
        n = len(prompts)
        context, pooled = self.encode_prompts(prompts)
        if self.description.get("force_zeros_for_empty_prompt"):
            empty_context, empty_pooled = np.zeros_like(context), None if pooled is None else np.zeros_like(pooled)
        else:
            empty_context, empty_pooled = self.encode_prompts([""] * n)
        feed = {"encoder_hidden_states": np.concatenate([empty_context, context])}
        if self.rules.pooled_text_embeds:
            feed["text_embeds"] = np.concatenate([empty_pooled, pooled])
            # original size, crop top-left, target size: the diffusers defaults
            feed["time_ids"] = np.tile(np.array([height, width, 0, 0, height, width], np.float32), (2 * n, 1))
        return {name: value.astype(self._unet_types[name]) for name, value in feed.items()}

    def initial_latents(self, seeds: list[int], height: int, width: int) -> np.ndarray:
        """Standard normal noise per seed (numpy's PCG64): the same seed, the same image."""
        channels = self.description["latent_channels"]
        return np.stack([np.random.default_rng(int(seed)).standard_normal((channels, height, width))
                         for seed in seeds]).astype(np.float32)

    def __call__(self, prompts: list[str], seeds: list[int] | None = None, *, steps: int = 25,
                 guidance: float = 4.0, height: int | None = None, width: int | None = None,
                 latents: np.ndarray | None = None, batch: int = 64) -> np.ndarray:
        """One image per prompt, uint8 (N, H, W, 3). ``latents`` (N, C, h, w) overrides seeds."""
        scale = self.description["vae_scale_factor"]
        default = self.description["default_latent_size"] * scale
        height, width = height or default, width or default
        if latents is None:
            if seeds is None or len(seeds) != len(prompts):
                raise ValueError("give one seed per prompt, or latents")
            latents = self.initial_latents(seeds, height // scale, width // scale)
        if len(latents) != len(prompts):
            raise ValueError("give one latent per prompt")
        height, width = latents.shape[2] * scale, latents.shape[3] * scale
        images = [self._generate(list(prompts[i:i + batch]), np.asarray(latents[i:i + batch], np.float32),
                                 steps, guidance, height, width) for i in range(0, len(prompts), batch)]
        return np.concatenate(images)

    def _generate(self, prompts: list[str], latents: np.ndarray, steps: int, guidance: float,
                  height: int, width: int) -> np.ndarray:
        n = len(prompts)
        conditioning = self._conditioning(prompts, height, width)
        for timestep in self.schedule.timesteps(steps):
            doubled = np.concatenate([latents, latents]).astype(self._unet_types["sample"])
            feed = {"sample": doubled, **conditioning,
                    "timestep": np.full(2 * n, timestep, dtype=self._unet_types["timestep"])}
            prediction = self.unet.run(["out_sample"], feed)[0].astype(np.float32)
            unconditional, conditional = prediction[:n], prediction[n:]
            guided = unconditional + guidance * (conditional - unconditional)
            latents = self.schedule.step(guided, int(timestep), latents, steps)
        scaled = latents / self.description["vae_scaling_factor"] + self.description["vae_shift_factor"]
        decoded = self.vae_decoder.run(["sample"], {"latent_sample": scaled.astype(self._decoder_type)})[0]
        pixels = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
        return (pixels.transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
