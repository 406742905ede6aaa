"""Tensor names in the two checkpoint layouts: diffusers folders and original single files.

The original single file (CompVis/Stability "LDM"/"SGM" layout, what A1111 and ComfyUI load)
stores every component in one state dict under a prefix:

    model.diffusion_model.*          the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*              the VAE (encoder.down.N.block.M, decoder.up.N, mid.attn_1)
    cond_stage_model.transformer.*   SD-1's CLIP text encoder (HF layout under text_model.)
    cond_stage_model.model.*         SD-2's OpenCLIP text encoder (resblocks, fused in_proj)
    conditioner.embedders.0.transformer.* / conditioner.embedders.1.model.*   SD-XL's two

This module maps diffusers names to original names (and tensors, where the layouts differ:
OpenCLIP fuses q/k/v into one ``in_proj``, stores ``text_projection`` transposed, and the VAE's
mid-block attention uses 1×1 convolutions instead of linear layers). The facts follow diffusers'
own conversion code (``diffusers/loaders/single_file_utils.py``), run in the other direction;
the tests check the round trip through diffusers' ``from_single_file``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from compiler.errors import UserError
from compiler.models.families import FAMILIES, UNET_PREFIX, VAE_PREFIX

# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

# diffusers ResnetBlock2D names -> LDM ResBlock names
_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP_LEVEL = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SD-XL's pooled-text + size conditioning
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


@dataclass(frozen=True)
class UNetLayout:
    """What the index arithmetic of the LDM UNet layout needs from a diffusers UNet config.

    LDM numbers the down path as one flat list ``input_blocks`` (conv_in, then per level
    ``layers_per_block`` resnets [+ attention] and one downsampler, except after the last
    level) and the up path as ``output_blocks`` (per level ``layers_per_block + 1`` resnets
    [+ attention], the last one carrying the upsampler).
    """

    layers_per_block: tuple[int, ...]  # per down level
    up_has_attention: tuple[bool, ...]  # per up level

    @classmethod
    def from_config(cls, config: Mapping) -> UNetLayout:
        levels = len(config["down_block_types"])
        per_block = config["layers_per_block"]
        if isinstance(per_block, int):
            per_block = [per_block] * levels
        up_has_attention = tuple("CrossAttn" in t for t in config["up_block_types"])
        return cls(tuple(int(n) for n in per_block), up_has_attention)

    def input_block(self, level: int, layer: int) -> int:
        """input_blocks index of down level ``level``'s ``layer``-th resnet/attention."""
        return 1 + sum(n + 1 for n in self.layers_per_block[:level]) + layer

    def output_block(self, level: int, layer: int) -> int:
        """output_blocks index of up level ``level``'s ``layer``-th resnet/attention."""
        up_layers = list(reversed(self.layers_per_block))
        return sum(n + 1 for n in up_layers[:level]) + layer

    def up_layers(self, level: int) -> int:
        return list(reversed(self.layers_per_block))[level] + 1


def _rename_resnet(rest: str) -> str:
    for new, old in _RESNET_RENAMES:
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)")


def unet_name_to_original(name: str, layout: UNetLayout) -> str:
    """A diffusers UNet parameter (or module) name -> its name in the original single file.

    ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`` ->
    ``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``.
    Inside attention blocks (Transformer2DModel) the names are the same in both layouts.
    A module name (no trailing parameter) is accepted too: a trailing dot is added for matching.
    """
    key = name if name.endswith(".") else name + "."
    for new, old in _UNET_TOP_LEVEL.items():
        if key.startswith(new):
            return (UNET_PREFIX + old + key[len(new):]).rstrip(".")
    if m := _DOWN.fullmatch(key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            out = f"input_blocks.{layout.input_block(level, index)}.0.{_rename_resnet(rest)}"
        elif kind == "attentions":
            out = f"input_blocks.{layout.input_block(level, index)}.1.{rest}"
        else:  # the downsampler's conv is an "op" after the level's layers
            rest = rest.removeprefix("conv.")
            out = f"input_blocks.{layout.input_block(level, layout.layers_per_block[level])}.0.op.{rest}"
        return (UNET_PREFIX + out).rstrip(".")
    if m := _MID.fullmatch(key):
        kind, index, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":  # middle_block = resnet, attention, resnet
            out = f"middle_block.{2 * index}.{_rename_resnet(rest)}"
        else:
            out = f"middle_block.1.{rest}"
        return (UNET_PREFIX + out).rstrip(".")
    if m := _UP.fullmatch(key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            out = f"output_blocks.{layout.output_block(level, index)}.0.{_rename_resnet(rest)}"
        elif kind == "attentions":
            out = f"output_blocks.{layout.output_block(level, index)}.1.{rest}"
        else:  # the upsampler follows the level's last resnet [and attention]
            last = layout.output_block(level, layout.up_layers(level) - 1)
            slot = 2 if layout.up_has_attention[level] else 1
            out = f"output_blocks.{last}.{slot}.{rest}"
        return (UNET_PREFIX + out).rstrip(".")
    raise KeyError(f"no single-file name for UNet tensor '{name}'")


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

_VAE_TOP_LEVEL = {
    "encoder.conv_norm_out.": "encoder.norm_out.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
}
_VAE_ATTENTION_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_VAE_BLOCKS = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)")


def vae_name_to_original(name: str, num_levels: int) -> str:
    """A diffusers AutoencoderKL parameter name -> its name in the original single file.

    The decoder's levels run the other way round: diffusers' ``decoder.up_blocks.0`` is the
    original ``decoder.up.{num_levels-1}``.
    """
    for new, old in _VAE_TOP_LEVEL.items():
        if name.startswith(new):
            return VAE_PREFIX + old + name[len(new):]
    if m := _VAE_BLOCKS.fullmatch(name):
        part, _, level, kind, index, rest = m[1], m[2], int(m[3]), m[4], int(m[5]), m[6]
        if part == "decoder":
            level = num_levels - 1 - level
        direction = "down" if part == "encoder" else "up"
        if kind == "resnets":
            rest = rest.replace("conv_shortcut.", "nin_shortcut.")
            out = f"{part}.{direction}.{level}.block.{index}.{rest}"
        else:
            sampler = "downsample" if kind == "downsamplers" else "upsample"
            out = f"{part}.{direction}.{level}.{sampler}.{rest}"
        return VAE_PREFIX + out
    if m := _VAE_MID.fullmatch(name):
        part, kind, index, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            out = f"{part}.mid.block_{index + 1}.{rest}"
        else:
            for new, old in _VAE_ATTENTION_RENAMES.items():
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            out = f"{part}.mid.attn_{index + 1}.{rest}"
        return VAE_PREFIX + out
    # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    return VAE_PREFIX + name


def _is_vae_attention_projection(original_name: str) -> bool:
    return bool(re.search(r"\.mid\.attn_\d+\.(q|k|v|proj_out)\.weight$", original_name))


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------


def clip_name_to_original(name: str, prefix: str) -> str:
    """An HF CLIPTextModel name -> original (prefix + ``text_model.`` + the HF name).

    transformers >= 5.6 names CLIPTextModel's tensors without the ``text_model.`` level
    (``encoder.layers.0...``); CLIPTextModelWithProjection still has it. Both are accepted.
    """
    if not name.startswith(("text_model.", "text_projection")):
        name = "text_model." + name
    return prefix + name


_OPENCLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.*)")
_OPENCLIP_LAYER_RENAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_QKV = re.compile(r"self_attn\.(q|k|v)_proj\.(weight|bias)")


def openclip_name_to_original(name: str, prefix: str) -> str:
    """An HF CLIP text-model name -> its OpenCLIP name in the original single file.

    q/k/v projections all map to the fused ``attn.in_proj_weight``/``in_proj_bias``.
    """
    if name == "text_projection.weight":
        return prefix + "text_projection"
    name = name.removeprefix("text_model.")
    if name in _OPENCLIP_TOP_LEVEL:
        return prefix + _OPENCLIP_TOP_LEVEL[name]
    if m := _OPENCLIP_LAYER.fullmatch(name):
        layer, rest = m[1], m[2]
        if q := _QKV.fullmatch(rest):
            return f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{q[2]}"
        for new, old in _OPENCLIP_LAYER_RENAMES.items():
            if rest.startswith(new):
                return f"{prefix}transformer.resblocks.{layer}.{old}{rest[len(new):]}"
    raise KeyError(f"no OpenCLIP name for text-encoder tensor '{name}'")


# --------------------------------------------------------------------------------------------
# Whole components
# --------------------------------------------------------------------------------------------


def text_encoder_name_to_original(family: str, component: str, name: str) -> str:
    spec = FAMILIES[family].text_encoder(component)
    if spec.original_prefix is None:
        raise KeyError(f"{family} has no single-file format")
    if spec.kind == "clip":
        return clip_name_to_original(name, spec.original_prefix)
    return openclip_name_to_original(name, spec.original_prefix)


def component_name_to_original(family: str, component: str, name: str, config: Mapping) -> str:
    """Name of tensor ``name`` of diffusers component ``component`` in the original file."""
    if component == "unet":
        return unet_name_to_original(name, UNetLayout.from_config(config))
    if component == "vae":
        return vae_name_to_original(name, len(config["down_block_types"]))
    return text_encoder_name_to_original(family, component, name)


def single_file_components(family: str) -> tuple[str, ...]:
    """The diffusers components a family's single file holds (empty: it has none)."""
    return FAMILIES[family].single_file_components


def component_to_original(
    family: str, component: str, state_dict: Mapping[str, torch.Tensor], config: Mapping
) -> dict[str, torch.Tensor]:
    """Convert one diffusers component's state dict to original single-file tensors."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # OpenCLIP in_proj: name -> {q,k,v}
    for name, tensor in state_dict.items():
        original = component_name_to_original(family, component, name, config)
        if original.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            which = _QKV.search(name)[1]
            fused.setdefault(original, {})[which] = tensor
        elif original.endswith("text_projection"):
            out[original] = tensor.t().contiguous()  # OpenCLIP multiplies x @ P
        elif component == "vae" and _is_vae_attention_projection(original):
            out[original] = tensor.reshape(*tensor.shape, 1, 1)  # linear -> 1x1 conv
        else:
            out[original] = tensor
    for original, parts in fused.items():
        out[original] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if component.startswith("text_encoder"):
        spec = FAMILIES[family].text_encoder(component)
        if spec.pass_through_after is not None:
            _complete_openclip(out, spec.original_prefix, spec.pass_through_after)
    return out


# SD-2's original OpenCLIP-H text tower has 24 resblocks and a text_projection. SD-2 conditions
# on the penultimate layer, so diffusers drops block 23 and the projection
# (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) and its text encoder has 23 layers. A file written back
# without them has a 23-block tower that ComfyUI reports as missing weights; their trained
# values are gone with the conversion, so the 24th block is written as the identity (zero
# attention and MLP outputs: it passes its input through) and the projection as the identity
# matrix. Nothing that SD-2 computes reads either (its UNet context is block 22's output).
# (The spec's ``pass_through_after`` says it: 23 for SD-2.)


def _complete_openclip(out: dict[str, torch.Tensor], prefix: str, reference_layers: int) -> None:
    last = f"{prefix}transformer.resblocks.{reference_layers - 1}."
    depth = len(prefix.split(".")) - 1 + 2  # the block index follows "<prefix>transformer.resblocks."
    layers = {k.split(".")[depth] for k in out if k.startswith(prefix + "transformer.resblocks.")}
    if len(layers) != reference_layers or last + "ln_1.weight" not in out:
        return  # not the reference encoder (a narrower model keeps its own layout)
    block = f"{prefix}transformer.resblocks.{reference_layers}."
    for key in [k for k in out if k.startswith(last)]:
        template = out[key]
        out[block + key[len(last):]] = sd2_completion_tensor(block + key[len(last):], template.shape, template.dtype,
                                                             template.device)
    if prefix + "text_projection" not in out:
        width = out[last + "ln_1.weight"].shape[0]
        out[prefix + "text_projection"] = sd2_completion_tensor(prefix + "text_projection", (width, width),
                                                                out[last + "ln_1.weight"].dtype)


def sd2_completion_tensor(original: str, shape, dtype, device=None) -> torch.Tensor:
    """The value of a tensor that :func:`_complete_openclip` adds: the identity projection,
    unit layer-norm scales, zeros for the rest of the pass-through block."""
    if original.endswith("text_projection"):
        return torch.eye(int(shape[0]), dtype=dtype, device=device)
    if original.endswith(("ln_1.weight", "ln_2.weight")):
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def expected_original_names(
    family: str, component: str, names: Sequence[str], config: Mapping
) -> set[str]:
    """The original names a single file must hold for a component with these tensor names."""
    return {component_name_to_original(family, component, n, config) for n in names}


def pipeline_to_original(family: str, components: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The original single-file state dict of a pipeline's weights.

    ``components`` maps diffusers component names (``unet``, ``vae``, ``text_encoder``, …) to the
    loaded modules, e.g. ``pipeline.components``. Only the components a single file holds are read.
    A model whose configs depart from the family's conventions (heads, VAE scaling factor,
    scheduler; see ``compiler.models.configs``) should be saved with
    ``compiler.models.configs.config_metadata(components)`` as the file's metadata.
    """
    if not single_file_components(family):
        raise ValueError(f"{family} has no single-file format")
    out: dict[str, torch.Tensor] = {}
    for component in single_file_components(family):
        module = components[component]
        config = module.config if component in ("unet", "vae") else {}
        out.update(component_to_original(family, component, module.state_dict(), config))
    return out


# --------------------------------------------------------------------------------------------
# Qualified diffusers names (``<component>/<parameter>``) and values <-> the original file
# --------------------------------------------------------------------------------------------


def original_name(family: str, qualified: str, configs: Mapping[str, Mapping]) -> str:
    """The single-file name holding diffusers tensor ``<component>/<parameter>``."""
    component, _, parameter = qualified.partition("/")
    config = configs.get(component, {}) if component in ("unet", "vae") else {}
    try:
        return component_name_to_original(family, component, parameter, config)
    except (KeyError, StopIteration) as err:
        raise UserError(f"{qualified}: no {family} single-file name for this tensor ({err})") from None


def original_names(family: str, qualified_names: Iterable[str], configs: Mapping[str, Mapping]) -> dict[str, str]:
    return {name: original_name(family, name, configs) for name in sorted(qualified_names)}


def to_original_value(qualified: str, original: str, value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The new content of original tensor ``original`` (now ``current``) once diffusers tensor
    ``qualified`` becomes ``value``, in ``current``'s dtype and shape."""
    value = value.detach().to("cpu")
    if original.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
        which = "qkv".index(_QKV.search(qualified)[1])
        rows = current.shape[0] // 3
        patched = current.clone()
        patched[which * rows:(which + 1) * rows] = value.to(current.dtype)
        return patched
    if original.endswith("text_projection") and not original.endswith(".weight"):
        value = value.t()
    if value.numel() != current.numel():
        raise UserError(f"{qualified}: new tensor has shape {list(value.shape)}, but {original} in "
                        f"the checkpoint is {list(current.shape)}; the edit was made for another model")
    return value.reshape(current.shape).to(current.dtype).contiguous()


def from_original_value(qualified: str, original: str, stored: torch.Tensor) -> torch.Tensor:
    """The diffusers tensor ``qualified`` read out of original tensor ``stored`` (inverse of
    :func:`to_original_value`; VAE 1×1 convolutions stay 4-D, compare by values)."""
    if original.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
        which = "qkv".index(_QKV.search(qualified)[1])
        rows = stored.shape[0] // 3
        return stored[which * rows:(which + 1) * rows]
    if original.endswith("text_projection") and not original.endswith(".weight"):
        return stored.t()
    return stored
