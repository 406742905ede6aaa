"""Config folders for offline single-file loading.

diffusers 0.42 builds a pipeline from an original single file only with a diffusers config
folder next to it (``from_single_file(path, config=folder)``); without one it goes to the Hub.
editc ships those folders for the reference models in ``compiler/assets/configs/{sd1,sd2,sdxl}``
(SD-1.5, SD-2.1 768-v and SD-XL base 1.0; the tokenizer vocab/merges are links to the CLIP
tokenizer files in ``compiler/assets/tokenizers/clip``).

A single file carries no config, and not every checkpoint has the reference widths (the toy
model exported to a single file, the tiny test fixtures, fine-tunes with another depth), so the
component configs are *inferred from the tensor shapes*: widths, depths and layer counts are read
off the tensors and written over the shipped config. What shapes cannot tell follows the
family's convention: UNet attention heads (SD-1: 8 heads; SD-2/SD-XL: 64 channels per head)
and text-encoder heads (64 channels per head), with at least one head. For a reference-size
checkpoint the inferred values equal the shipped ones, and the shipped folder is used as is.

A model that departs from those conventions (the toy model: 4 text heads of 32 channels, its own
VAE scaling factor and scheduler) cannot be described by its shapes. When editc writes such a
model as a single file it stores the component configs in the safetensors ``__metadata__``
under ``editc.diffusers_config`` (``config_metadata()``), and loading uses them instead; the
tensors are still checked against them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from compiler.errors import UserError
from compiler.models.families import FAMILIES, UNET_PREFIX, VAE_PREFIX, FamilyDetection, TextEncoderSpec

CONFIG_METADATA_KEY = "editc.diffusers_config"

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "assets" / "configs"
HEAD_CHANNELS = 64  # channels per attention head in CLIP/OpenCLIP text towers and SD-2/XL UNets

Shapes = Mapping[str, tuple[int, ...]]


def shipped_config_folder(family: str) -> Path:
    folder = CONFIG_ROOT / FAMILIES[family].shipped_configs
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{folder}: the shipped config folder for {family} is missing; "
                        f"reinstall editc")
    return folder


def load_shipped_configs(family: str) -> dict[str, dict]:
    """The shipped configs: ``{"model_index": ..., "unet": ..., "scheduler": ..., ...}``."""
    folder = shipped_config_folder(family)
    configs = {"model_index": json.loads((folder / "model_index.json").read_text())}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for name in ("config.json", "scheduler_config.json"):
            if (sub / name).is_file():
                configs[sub.name] = json.loads((sub / name).read_text())
    return configs


# --------------------------------------------------------------------------------------------
# Inference from shapes
# --------------------------------------------------------------------------------------------


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """Distinct integers captured by ``pattern`` (one group) over all keys, sorted."""
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in shapes if (m := regex.match(k))})


def _heads(channels: int) -> int:
    return max(1, channels // HEAD_CHANNELS)


def infer_unet_config(family: str, shapes: Shapes, base: Mapping) -> dict:
    """The UNet config that the original-layout UNet tensors in ``shapes`` need."""
    p = UNET_PREFIX
    config = copy.deepcopy(dict(base))
    input_blocks = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    downsamplers = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(downsamplers) + 1
    per_level = len(input_blocks) // levels  # conv_in + (layers + 1) per level - 1 for the last
    layers_per_block = per_level - 1
    if levels * per_level != len(input_blocks) or layers_per_block < 1:
        raise UserError(f"UNet input_blocks ({len(input_blocks)}) do not form a regular "
                        f"{levels}-level layout")

    def first_input(level: int) -> str:
        return f"{p}input_blocks.{1 + level * per_level}."

    block_out_channels, down_types, transformer_layers = [], [], []
    for level in range(levels):
        prefix = first_input(level)
        block_out_channels.append(int(shapes[prefix + "0.out_layers.3.weight"][0]))
        depth = len(_indices(shapes, re.escape(prefix) + r"1\.transformer_blocks\.(\d+)\."))
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        transformer_layers.append(depth or 1)
    up_types = []
    for level in range(levels):
        prefix = f"{p}output_blocks.{level * per_level}.1.transformer_blocks.0."
        up_types.append("CrossAttnUpBlock2D" if any(k.startswith(prefix) for k in shapes)
                        else "UpBlock2D")

    attn_level = next(i for i, t in enumerate(down_types) if t == "CrossAttnDownBlock2D")
    attn_prefix = first_input(attn_level) + "1."
    config["in_channels"] = int(shapes[p + "input_blocks.0.0.weight"][1])
    config["out_channels"] = int(shapes[p + "out.2.weight"][0])
    config["block_out_channels"] = block_out_channels
    config["layers_per_block"] = layers_per_block
    config["down_block_types"] = down_types
    config["up_block_types"] = up_types
    config["cross_attention_dim"] = int(shapes[attn_prefix + "transformer_blocks.0.attn2.to_k.weight"][1])
    config["use_linear_projection"] = len(shapes[attn_prefix + "proj_in.weight"]) == 2
    rules = FAMILIES[family]
    if rules.unet_heads is not None:
        config["attention_head_dim"] = rules.unet_heads
    else:
        config["attention_head_dim"] = [_heads(c) for c in block_out_channels]
    if rules.time_ids or any(n != 1 for n in transformer_layers):
        config["transformer_layers_per_block"] = transformer_layers
    if rules.time_ids:
        # label_emb input = 6 size/crop numbers × addition_time_embed_dim + pooled text width
        pooling = next(spec for spec in rules.text_encoders if spec.with_projection)
        pooled = int(shapes[pooling.original_prefix + "text_projection"][1])
        label_in = int(shapes[p + "label_emb.0.0.weight"][1])
        config["projection_class_embeddings_input_dim"] = label_in
        config["addition_time_embed_dim"] = (label_in - pooled) // 6
    return config


def infer_vae_config(shapes: Shapes, base: Mapping) -> dict:
    p = VAE_PREFIX
    config = copy.deepcopy(dict(base))
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    config["block_out_channels"] = [
        int(shapes[f"{p}encoder.down.{level}.block.0.conv1.weight"][0]) for level in levels]
    config["layers_per_block"] = len(_indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    config["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
    config["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
    config["in_channels"] = int(shapes[p + "encoder.conv_in.weight"][1])
    config["out_channels"] = int(shapes[p + "decoder.conv_out.weight"][0])
    config["latent_channels"] = int(shapes[p + "post_quant_conv.weight"][0])
    return config


def infer_clip_config(shapes: Shapes, prefix: str, base: Mapping) -> dict:
    """An OpenAI-CLIP text encoder stored in HF layout under ``prefix`` (SD-1, SD-XL's first)."""
    p = prefix + "text_model."
    config = copy.deepcopy(dict(base))
    vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
    config["hidden_size"] = int(hidden)
    config["vocab_size"] = int(vocab)
    config["max_position_embeddings"] = int(shapes[p + "embeddings.position_embedding.weight"][0])
    config["num_hidden_layers"] = len(_indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."))
    config["intermediate_size"] = int(shapes[p + "encoder.layers.0.mlp.fc1.weight"][0])
    config["num_attention_heads"] = _heads(int(hidden))
    if hidden != base.get("hidden_size"):
        config["projection_dim"] = int(hidden)  # SD-1's CLIPTextModel has no projection tensor
    return config


def infer_openclip_config(spec: TextEncoderSpec, shapes: Shapes, base: Mapping) -> dict:
    """An OpenCLIP text encoder (SD-2, SD-XL's second) stored in OpenCLIP layout."""
    prefix = spec.original_prefix
    config = copy.deepcopy(dict(base))
    vocab, hidden = shapes[prefix + "token_embedding.weight"]
    layers = _indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    num_layers = len(layers)
    if spec.pass_through_after is not None and num_layers == spec.pass_through_after + 1:
        # SD-2 reads the penultimate layer: its 24th resblock is unused, and diffusers drops it
        # (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE), so the diffusers text encoder has 23 layers.
        num_layers = spec.pass_through_after
    config["hidden_size"] = int(hidden)
    config["vocab_size"] = int(vocab)
    config["max_position_embeddings"] = int(shapes[prefix + "positional_embedding"][0])
    config["num_hidden_layers"] = num_layers
    config["intermediate_size"] = int(shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0])
    config["num_attention_heads"] = _heads(int(hidden))
    if spec.with_projection:
        # SD-XL's second encoder is a CLIPTextModelWithProjection (pooled embeds); SD-2's
        # CLIPTextModel has no projection, and diffusers drops SD-2's text_projection tensor.
        config["projection_dim"] = int(shapes[prefix + "text_projection"][1])
    return config


def infer_single_file_configs(
    detection: FamilyDetection, shapes: Shapes, prediction_type: str | None
) -> dict[str, dict]:
    """All component configs for a single file: the shipped ones, overwritten from shapes."""
    family = detection.family
    configs = load_shipped_configs(family)
    configs["unet"] = infer_unet_config(family, shapes, configs["unet"])
    configs["vae"] = infer_vae_config(shapes, configs["vae"])
    for spec in FAMILIES[family].text_encoders:
        if spec.kind == "clip":
            configs[spec.component] = infer_clip_config(shapes, spec.original_prefix,
                                                        configs[spec.component])
        else:
            configs[spec.component] = infer_openclip_config(spec, shapes, configs[spec.component])
    rules = FAMILIES[family]
    if rules.prediction_type_ambiguous and prediction_type is not None:
        # SD-2: 512-base (epsilon) and 768-v (v-prediction) differ in their scheduler and sizes only.
        configs["scheduler"]["prediction_type"] = prediction_type
        for component, changes in rules.prediction_type_configs.get(prediction_type, {}).items():
            configs[component].update(changes)
    return configs


# --------------------------------------------------------------------------------------------
# Configs carried in a single file's metadata
# --------------------------------------------------------------------------------------------

_CONFIG_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


def config_metadata(components: Mapping[str, object]) -> dict[str, str]:
    """safetensors metadata that lets a single file written from ``components`` (e.g.
    ``pipeline.components``) load back with exactly their configs: ``{CONFIG_METADATA_KEY: json}``."""
    stored = {}
    for name in _CONFIG_COMPONENTS:
        module = components.get(name)
        if module is None:
            continue
        config = module.config
        if hasattr(config, "to_dict"):  # transformers
            stored[name] = config.to_dict()
        else:  # diffusers: the class is not part of .config until saved
            stored[name] = {"_class_name": type(module).__name__, **dict(config)}
    return {CONFIG_METADATA_KEY: json.dumps(stored, sort_keys=True, default=str)}


def apply_config_metadata(configs: Mapping[str, Mapping], stored_json: str, source: str) -> dict[str, dict]:
    """``configs`` with each component's config replaced by the one stored in the file."""
    try:
        stored = json.loads(stored_json)
        if not isinstance(stored, dict) or not all(isinstance(v, dict) for v in stored.values()):
            raise ValueError("not an object of component configs")
    except ValueError as err:
        raise UserError(f"{source}: unreadable {CONFIG_METADATA_KEY} metadata ({err})") from None
    out = copy.deepcopy(dict(configs))
    for name, config in stored.items():
        if name not in _CONFIG_COMPONENTS or name not in out:
            raise UserError(f"{source}: {CONFIG_METADATA_KEY} metadata holds a config for "
                            f"'{name}', which this family does not have")
        out[name] = dict(config)
    if "scheduler" in stored and "_class_name" in stored["scheduler"]:
        out["model_index"]["scheduler"] = ["diffusers", stored["scheduler"]["_class_name"]]
    return out


# --------------------------------------------------------------------------------------------
# A folder diffusers can read
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def config_folder(family: str, configs: Mapping[str, Mapping]) -> Iterator[Path]:
    """A diffusers config folder holding ``configs``: the shipped folder if they are the shipped
    configs, else a temporary copy with the differing JSON files rewritten (deleted on exit)."""
    shipped = shipped_config_folder(family)
    if dict(configs) == load_shipped_configs(family):
        yield shipped
        return
    with tempfile.TemporaryDirectory(prefix=f"editc-config-{family}-") as tmp:
        folder = Path(tmp) / family
        # Follow the tokenizer links: a copy must not depend on relative link targets.
        shutil.copytree(shipped, folder, symlinks=False)
        (folder / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2))
        for component, config in configs.items():
            if component == "model_index":
                continue
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            (folder / component / name).write_text(json.dumps(config, indent=2))
        yield folder
