"""The layer registry: which tensors the editing methods touch, named in both layouts.

**Cross-attention layers** are numbered as the papers number them: the index is the position in
the *string-sorted* list of cross-attention module names. That is what the LocoGen code does
(``sorted()`` over the UNet's ``attn2`` module names), and it is not diffusers' module order:
``named_modules()`` yields down, up, then mid blocks, while the sorted order is down, mid, up.
On SD-1.5 the sorted order puts index 6 at the mid block and 7–15 in the up blocks, so the
paper's style window j=8, m=2 is ``up_blocks.1.attentions.1`` and ``.2``; on SD-XL the 70
layers are down_blocks.1 (0–3), down_blocks.2 (4–23), mid (24–33), up_blocks.0 (34–63),
up_blocks.1 (64–69).

SD/SD-XL cross-attention is ``…transformer_blocks.N.attn2`` with ``to_k``/``to_v``; DeepFloyd IF
has no attn2: its UNet's attention layers attend to the text through added projections
(``add_k_proj``/``add_v_proj``), which are listed instead, sorted the same way.

**Text-encoder layer 0**: the first self-attention layer's output projection of each text
encoder, which Diff-QuickFix edits. transformers >= 5.6 names CLIPTextModel's modules without
``text_model.``; the names recorded here are the ones the loaded model actually has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch

from compiler.errors import UserError
from compiler.models.families import FAMILIES
from compiler.models.layout import UNetLayout, text_encoder_name_to_original, unet_name_to_original


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One UNet cross-attention layer; tensor names are relative to the ``unet`` component."""

    index: int  # the papers' index (position in the sorted module names)
    module_name: str  # diffusers module, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2
    to_k: str  # diffusers weight name of W_K (…attn2.to_k.weight, or …add_k_proj.weight on IF)
    to_v: str
    original_to_k: str | None  # the same tensor in the original single file (None: IF)
    original_to_v: str | None
    context_dim: int  # input width of W_K/W_V: the text embedding width


@dataclass(frozen=True)
class TextEncoderLayer0:
    """A text encoder's layer-0 self-attention output projection (``W_out`` of Diff-QuickFix)."""

    component: str  # diffusers component, "text_encoder" or "text_encoder_2"
    module_name: str  # as the loaded model names it, e.g. encoder.layers.0.self_attn.out_proj
    weight: str  # state-dict names inside the component
    bias: str | None
    original_weight: str | None  # names in the original single file (None: IF)
    original_bias: str | None
    width: int  # the encoder's hidden size


@dataclass
class Registry:
    family: str
    cross_attention: list[CrossAttentionLayer]
    text_layer0: list[TextEncoderLayer0]
    # True when the text widths are the reference model's, so the papers' locations apply.
    matches_reference_widths: bool = True
    notes: list[str] = field(default_factory=list)

    def layers(self, indices: Iterable[int]) -> list[CrossAttentionLayer]:
        """The layers with the given papers' indices, checked."""
        out = []
        for i in indices:
            if not 0 <= i < len(self.cross_attention):
                raise UserError(f"cross-attention layer {i} does not exist; this {self.family} "
                                f"model has layers 0-{len(self.cross_attention) - 1}")
            out.append(self.cross_attention[i])
        return out

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "matches_reference_widths": self.matches_reference_widths,
            "cross_attention": [asdict(layer) for layer in self.cross_attention],
            "text_layer0": [asdict(t) for t in self.text_layer0],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------


def cross_attention_layers(family: str, unet: torch.nn.Module, unet_config: Mapping) -> list[CrossAttentionLayer]:
    """The cross-attention layers of a (possibly meta-device) diffusers UNet, papers' order."""
    kind = FAMILIES[family].cross_attention_kind
    modules = dict(unet.named_modules())
    if kind == "attn2":
        names = [n for n in modules if n.endswith(".attn2")]
        k_attr, v_attr = "to_k", "to_v"
    else:
        names = [n for n, m in modules.items() if getattr(m, "add_k_proj", None) is not None]
        k_attr, v_attr = "add_k_proj", "add_v_proj"
    layout = UNetLayout.from_config(unet_config) if FAMILIES[family].has_single_file_format else None
    layers = []
    for index, name in enumerate(sorted(names)):
        to_k, to_v = f"{name}.{k_attr}.weight", f"{name}.{v_attr}.weight"
        context_dim = getattr(modules[name], k_attr).in_features
        original_k = unet_name_to_original(to_k, layout) if layout else None
        original_v = unet_name_to_original(to_v, layout) if layout else None
        layers.append(CrossAttentionLayer(index, name, to_k, to_v, original_k, original_v,
                                          int(context_dim)))
    return layers


# Layer 0's attention output projection, as each text-encoder class names it.
_LAYER0_CANDIDATES = (
    "text_model.encoder.layers.0.self_attn.out_proj",  # CLIPTextModelWithProjection, CLIP < 5.6
    "encoder.layers.0.self_attn.out_proj",  # CLIPTextModel in transformers >= 5.6
    "encoder.block.0.layer.0.SelfAttention.o",  # T5EncoderModel (no bias)
)


def text_layer0(family: str, component: str, encoder: torch.nn.Module) -> TextEncoderLayer0:
    modules = dict(encoder.named_modules())
    name = next((c for c in _LAYER0_CANDIDATES if c in modules), None)
    if name is None:
        raise UserError(f"{component}: {type(encoder).__name__} has no layer-0 self-attention "
                        f"output projection under a known name ({', '.join(_LAYER0_CANDIDATES)})")
    module = modules[name]
    weight = name + ".weight"
    bias = name + ".bias" if getattr(module, "bias", None) is not None else None
    if FAMILIES[family].has_single_file_format:
        original_weight = text_encoder_name_to_original(family, component, weight)
        original_bias = text_encoder_name_to_original(family, component, bias) if bias else None
    else:
        original_weight = original_bias = None
    return TextEncoderLayer0(component, name, weight, bias, original_weight, original_bias,
                             int(module.in_features))


def registry_from_components(
    family: str, components: Mapping[str, torch.nn.Module], matches_reference_widths: bool = True
) -> Registry:
    """A registry from diffusers components (loaded, or instantiated on the meta device)."""
    unet = components["unet"]
    layers = cross_attention_layers(family, unet, unet.config)
    text = [text_layer0(family, spec.component, components[spec.component])
            for spec in FAMILIES[family].text_encoders if components.get(spec.component) is not None]
    notes = []
    expected = FAMILIES[family].cross_attention_layers
    if expected is not None and len(layers) != expected:
        notes.append(f"{len(layers)} cross-attention layers where {family} has {expected}: the "
                     f"papers' layer indices do not apply")
    return Registry(family, layers, text, matches_reference_widths, notes)
