"""Tiny random checkpoints with each family's exact block layout and tensor names.

    python -m compiler.testing.tiny --family {sd1,sd2,sdxl,if} --format {diffusers,single-file} --out PATH

The widths are cut down to a few dozen channels, but nothing structural is: the UNets have the
reference models' levels, ``layers_per_block``, transformer depths and block types (16
cross-attention layers for sd1/sd2, 70 for sdxl with ``transformer_layers_per_block`` (1, 2, 10)),
the VAEs SD's four levels of two resnets, the text encoders the reference classes (CLIP with the
real CLIP vocabulary and tokenizer files, OpenCLIP-style ``gelu`` encoders, a T5 encoder for
IF). Widths follow the family conventions that single-file loading relies on (see
``compiler.models.configs``), so a single file written here loads back into the same model.

``--format single-file`` converts to the original layout with ``compiler.models.layout`` and
writes ``.safetensors`` (or ``.ckpt`` when PATH ends in ``.ckpt``: ``{"state_dict": ...}``, as
CompVis checkpoints are). DeepFloyd IF has no single-file format. Writes are atomic (a temporary
sibling, then a rename); an existing PATH is replaced only with ``--force``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Nothing may ever be downloaded from a model hub (set before diffusers/transformers load).

import click  # noqa: E402
import torch  # noqa: E402

from compiler.errors import UserError
from compiler.models.families import FAMILIES

CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "clip"
CLIP_VOCAB_SIZE = 49408
SEED = 0

# ---- the tiny models, as data ---------------------------------------------------------------
# Channels are multiples of 32 because every GroupNorm has 32 groups, as in the real models.

_SD_UNET_COMMON = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32, 64, 64, 64),
)
_SD_VAE = dict(
    sample_size=32, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, block_out_channels=(32, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


_SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
_NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _clip_components(spec: dict) -> dict:
    """The VAE and the CLIP text encoders and tokenizers (one per entry of ``pad_tokens``), in
    the order the random weights are drawn."""
    from diffusers import AutoencoderKL

    components = {"vae": AutoencoderKL(**spec["vae"])}
    for index, pad_token in enumerate(spec["pad_tokens"]):
        suffix = f"_{index + 1}" if index else ""
        components[f"text_encoder{suffix}"] = _clip_text_model(spec[f"text_encoder{suffix}"])
        components[f"tokenizer{suffix}"] = _clip_tokenizer(pad_token)
    return components


def _t5_components(spec: dict) -> dict:
    """The T5 encoder and its tokenizer (DeepFloyd IF: pixel space, no VAE)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    return {"tokenizer": tokenizer,
            "text_encoder": T5EncoderModel(T5Config(vocab_size=len(tokenizer), **spec["text_encoder"]))}


def _clip_text(hidden: int, act: str, projection: bool = False) -> dict:
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                num_attention_heads=max(1, hidden // 64), hidden_act=act,
                max_position_embeddings=77, vocab_size=CLIP_VOCAB_SIZE, projection_dim=hidden,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                _projection=projection)


# Besides the configs, per family: ``components`` (a hook that draws the text encoders and the
# VAE), ``pad_tokens`` (the CLIP tokenizers' padding, one per encoder), ``scheduler`` (its
# diffusers class and arguments) and ``pipeline`` (more arguments of the family's pipeline class,
# ``Family.pipeline_class``).
TINY = {
    "sd1": dict(
        unet=dict(_SD_UNET_COMMON, cross_attention_dim=32, attention_head_dim=8),
        vae=dict(_SD_VAE, scaling_factor=0.18215),
        text_encoder=_clip_text(32, "quick_gelu"),
        components=_clip_components, pad_tokens=("<|endoftext|>",),
        scheduler=("PNDMScheduler", dict(_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)),
        pipeline=_NO_SAFETY_CHECKER,
    ),
    "sd2": dict(
        unet=dict(_SD_UNET_COMMON, cross_attention_dim=64, attention_head_dim=[1, 1, 1, 1],
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(_SD_VAE, scaling_factor=0.18215),
        text_encoder=_clip_text(64, "gelu"),
        components=_clip_components, pad_tokens=("!",),
        scheduler=("DDIMScheduler", dict(_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                                         prediction_type="v_prediction")),
        pipeline=_NO_SAFETY_CHECKER,
    ),
    "sdxl": dict(
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64), transformer_layers_per_block=[1, 2, 10],
            cross_attention_dim=32 + 64, attention_head_dim=[1, 1, 1], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 64,
        ),
        vae=dict(_SD_VAE, scaling_factor=0.13025, force_upcast=True),
        text_encoder=_clip_text(32, "quick_gelu"),
        text_encoder_2=_clip_text(64, "gelu", projection=True),
        components=_clip_components, pad_tokens=("<|endoftext|>", "!"),
        scheduler=("EulerDiscreteScheduler", dict(_SD_SCHEDULE, timestep_spacing="leading")),
        pipeline=dict(force_zeros_for_empty_prompt=True, add_watermarker=False),
    ),
    # DeepFloyd IF stage I: pixel-space UNet (3 channels in, 6 out: epsilon and variance), four
    # levels of three resnets with AttnAddedKV cross-attention at the three lower resolutions
    # (the layout diffusers' scripts/convert_if.py builds for IF-I), a T5 encoder whose states the
    # UNet projects with encoder_hid_proj.
    "if": dict(
        unet=dict(
            sample_size=16, in_channels=3, out_channels=6, layers_per_block=3, norm_num_groups=32,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
            cross_attention_dim=64, encoder_hid_dim=32, attention_head_dim=32,
            addition_embed_type="text", addition_embed_type_num_heads=2,
            cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
        ),
        text_encoder=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"),
        components=_t5_components,
        scheduler=("DDPMScheduler", dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2",
                                         prediction_type="epsilon", thresholding=True,
                                         dynamic_thresholding_ratio=0.95, sample_max_value=1.5)),
        pipeline=dict(_NO_SAFETY_CHECKER, watermarker=None),
    ),
}

# A small T5-style unigram vocabulary for the tiny IF tokenizer (T5's real sentencepiece model
# cannot be fetched offline): whole words of the papers' prompts, then single letters.
_T5_WORDS = ("a an the of in on by photo picture image painting style house dog cat van gogh "
             "monet snoopy r2d2 king charles british monarch president united states").split()


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -5.0) for w in _T5_WORDS]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)


def _clip_tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    # from_pretrained, not CLIPTokenizer(vocab_file=..., merges_file=...): transformers 5
    # ignores those arguments and builds an empty 3-token vocabulary.
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER), pad_token=pad_token, model_max_length=77)


def _clip_text_model(spec: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = dict(spec)
    projection = spec.pop("_projection")
    config = CLIPTextConfig(**spec)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_tiny_pipeline(family: str, seed: int = SEED):
    """A tiny random diffusers pipeline of ``family`` (deterministic for a seed)."""
    import diffusers

    if family not in TINY:
        raise UserError(f"unknown family '{family}'; valid: {', '.join(TINY)}")
    spec = TINY[family]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**spec["unet"])
    components = spec["components"](spec)
    scheduler_class, scheduler_options = spec["scheduler"]
    pipeline_class = getattr(diffusers, FAMILIES[family].pipeline_class)
    return pipeline_class(unet=unet, scheduler=getattr(diffusers, scheduler_class)(**scheduler_options),
                          **components, **spec["pipeline"])


# ---- writing --------------------------------------------------------------------------------


def _replace_atomically(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out}: already exists; pass --force to replace it")
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(tmp, out)


def write_tiny(family: str, fmt: str, out: str | Path, *, dtype: torch.dtype = torch.float32,
               seed: int = SEED, force: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Write a tiny ``family`` checkpoint in ``fmt`` ('diffusers' | 'single-file') to ``out``."""
    from compiler.models.layout import pipeline_to_original

    out = Path(out)
    if family not in TINY:
        raise UserError(f"unknown family '{family}'; valid: {', '.join(TINY)}")
    if fmt == "single-file" and not FAMILIES[family].has_single_file_format:
        raise UserError(f"{family}: DeepFloyd IF has no single-file format; use --format diffusers")
    if fmt == "single-file" and out.suffix.lower() not in (".safetensors", ".ckpt"):
        raise UserError(f"{out}: a single-file checkpoint must end in .safetensors or .ckpt")
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"{out}: already exists; pass --force to replace it")
    pipe = build_tiny_pipeline(family, seed)
    if dtype != torch.float32:
        pipe = pipe.to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if fmt == "diffusers":
            pipe.save_pretrained(tmp, safe_serialization=True)
            _replace_atomically(tmp, out, force)
        elif fmt == "single-file":
            state = {k: v.contiguous() for k, v in pipeline_to_original(family, pipe.components).items()}
            target = tmp / out.name
            if out.suffix.lower() == ".ckpt":
                torch.save({"state_dict": state}, target)
            else:
                from safetensors.torch import save_file

                save_file(state, target, metadata=metadata)
            _replace_atomically(target, out, force)
        else:
            raise UserError(f"unknown format '{fmt}'; valid: diffusers, single-file")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--family", required=True, type=click.Choice(list(TINY)), help="Model family.")
@click.option("--format", "fmt", required=True, type=click.Choice(["diffusers", "single-file"]),
              help="A diffusers folder, or an original single file (.safetensors or .ckpt).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output folder (diffusers) or file ending in .safetensors/.ckpt (single-file).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--seed", type=int, default=SEED, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output.")
def main(family: str, fmt: str, out: Path, dtype: str, seed: int, force: bool) -> None:
    """Write a tiny random checkpoint with FAMILY's exact block layout and tensor names."""
    try:
        path = write_tiny(family, fmt, out, dtype=getattr(torch, dtype), seed=seed, force=force)
    except UserError as err:
        click.echo(f"editc: error: {err}", err=True)
        sys.exit(2)
    click.echo(f"wrote tiny {family} ({fmt}) to {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
