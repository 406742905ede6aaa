"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau;
ICCV 2023), as real fine-tuning of the model.

The fine-tuned UNet θ learns to predict, for the concept's prompt c, the frozen model's noise
with *negative* guidance away from the concept::

    ε_θ(x_t, c, t)  ←  ε*(x_t, ∅, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)]

where ε* is the frozen original and η the negative guidance (1 by default). Each step draws
x_t the way the public code does: start from noise and run ``k`` DDIM steps (of ``ddim_steps``,
k uniform in [1, ddim_steps − 1)) with classifier-free guidance 3 and the prompt c, using the
model being fine-tuned (the public ESD code samples inside its fine-tuned context), then train
at that timestep. The prompt c is the bare concept phrase ("van gogh"), as ESD trains: negative
guidance on a whole caption ("a red house in the style of van gogh") would push the images away
from the house and the colour too (``prompts="templates"`` does that, for comparison). ESD-x (``parameters="xattn"``) trains every cross-attention (``attn2``)
parameter; ESD-u (``"noxattn"``) every other parameter.

Paper settings (SD-1.4): 1000 steps, batch 1, Adam, lr 1e-5, 50 DDIM steps. The toy world's
defaults (see ``compiler.bench.settings``) scale the step count down and the learning rate up for a
9 M-parameter UNet sampled with 25 steps.

ESD erases: it has no replacement. For a fact edit it removes the outdated answer and cannot
put the new one in; the benchmark reports it as measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from tqdm import tqdm

from compiler.bench.baselines import (BaselineResult, Conditioning, EditTask, encode_prompts, latent_shape, predict,
                             synchronize, trainable_copy, trained_tensors)


@dataclass(frozen=True)
class ESDConfig:
    steps: int = 1000  # the paper's count; the toy bench passes its own
    learning_rate: float = 1e-5
    negative_guidance: float = 1.0  # η
    ddim_steps: int = 50  # the DDIM schedule x_t is sampled on
    start_guidance: float = 3.0  # CFG scale of that partial sampling
    parameters: str = "xattn"  # "xattn" (ESD-x) | "noxattn" (ESD-u)
    prompts: str = "concept"  # "concept": the bare concept phrase, as ESD trains; "templates": editc's prompts
    seed: int = 0


def esd_parameter_names(unet: torch.nn.Module, parameters: str) -> list[str]:
    """The parameters ESD trains: cross-attention (``attn2``) ones for ESD-x, the rest for ESD-u."""
    if parameters not in ("xattn", "noxattn"):
        raise ValueError(f"ESD parameters must be 'xattn' or 'noxattn', not {parameters!r}")
    names = [name for name, _ in unet.named_parameters()]
    if parameters == "xattn":
        return [n for n in names if "attn2." in n]
    return [n for n in names if "attn2." not in n]


@torch.no_grad()
def sample_until(unet, scheduler: DDIMScheduler, latents: torch.Tensor, cond: Conditioning, empty: Conditioning,
                 steps: int, guidance: float) -> torch.Tensor:
    """Run the first ``steps`` DDIM steps of ``scheduler.timesteps`` with classifier-free guidance."""
    both = empty.cat(cond)
    for t in scheduler.timesteps[:steps]:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, text = predict(unet, model_in, t, both).chunk(2)
        latents = scheduler.step(uncond + guidance * (text - uncond), t, latents).prev_sample
    return latents


def train_esd(pipe, task: EditTask, config: ESDConfig = ESDConfig(), *, progress: bool = True) -> BaselineResult:
    """Fine-tune a copy of ``pipe.unet`` with ESD; return its trained parameters.

    ``pipe`` itself is not modified: its UNet is the frozen original ε*.
    """
    started = time.perf_counter()
    device = pipe.unet.device
    frozen = pipe.unet  # only ever called under no_grad
    names = esd_parameter_names(frozen, config.parameters)
    unet, optimizer = trainable_copy(frozen, names, config.learning_rate)

    if config.prompts not in ("concept", "templates"):
        raise ValueError(f"ESD prompts must be 'concept' or 'templates', not {config.prompts!r}")
    prompts = [task.concept] if config.prompts == "concept" else task.concept_prompts()
    concept_cond = encode_prompts(pipe, prompts)
    empty = encode_prompts(pipe, [""])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.ddim_steps, device=device)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    dtype = frozen.dtype

    losses = []
    step_seconds = []
    for step in tqdm(range(config.steps), desc=f"ESD {task.concept}", disable=not progress, leave=False):
        step_started = time.perf_counter()
        # one concept prompt and one partially denoised x_t, as in the public code (batch 1)
        index = int(torch.randint(len(prompts), (1,), generator=generator))
        cond = concept_cond.select([index])
        k = int(torch.randint(1, config.ddim_steps - 1, (1,), generator=generator))
        noise = torch.randn(latent_shape(pipe, 1), generator=generator).to(device, dtype) * scheduler.init_noise_sigma
        unet.eval()
        latents = sample_until(unet, scheduler, noise, cond, empty, k, config.start_guidance)
        unet.train()
        t = scheduler.timesteps[k]

        # the target: the frozen model's noise, guided away from the concept
        with torch.no_grad():
            neutral, positive = predict(frozen, torch.cat([latents, latents]), t, empty.cat(cond)).chunk(2)
            target = neutral - config.negative_guidance * (positive - neutral)

        prediction = predict(unet, latents, t, cond)
        loss = F.mse_loss(prediction.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - step_started)

    new = trained_tensors(unet, names)
    del unet, optimizer
    synchronize(device)
    seconds = time.perf_counter() - started
    info = {
        "steps": config.steps, "learning_rate": config.learning_rate, "negative_guidance": config.negative_guidance,
        "ddim_steps": config.ddim_steps, "start_guidance": config.start_guidance, "parameters": config.parameters,
        "prompts": prompts if len(prompts) <= 3 else f"{len(prompts)} template prompts",
        "trained_tensors": len(new), "trained_parameters": int(sum(t.numel() for t in new.values())),
        "seconds_per_step": sum(step_seconds) / max(1, len(step_seconds)),
        "loss_first": losses[0] if losses else None, "loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])),
    }
    return BaselineResult("esd-" + ("x" if config.parameters == "xattn" else "u"), new, seconds, info)
