"""The model families editc knows, as data, and how to tell them apart.

A *family* fixes the block layout of the UNet, the text encoder(s) and the names of every tensor
in both checkpoint layouts (a diffusers folder and the original single file that A1111/ComfyUI
load). Widths may differ from the reference model: the embedded toy model and the tiny test
fixtures have SD-1.5's layout with narrow layers, and they are still ``sd1``. What the family
decides is which names, conversions and paper results apply; ``matches_reference_widths`` says
whether the paper's known layer locations (measured on the full-size models) may be used.

Detection is done here from keys and shapes, never delegated: diffusers' own single-file
detection silently falls back to SD-1 ("v1") for anything it does not recognise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from compiler.errors import UserError

# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, at the reference model's size."""

    component: str  # the diffusers sub-folder, e.g. "text_encoder_2"
    kind: str  # "clip" (OpenAI CLIP, HF layout), "openclip" (OpenCLIP layout), "t5"
    name: str  # what it is, for people
    width: int  # hidden size of the reference model
    # Where the encoder lives in the original single file (None: the family has no single file).
    original_prefix: str | None


@dataclass(frozen=True)
class LayerWindow:
    """A window of adjacent cross-attention layers ``start … start+size-1`` (papers' index)."""

    start: int
    size: int

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.start + self.size))


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2" | "sdxl" | "if"
    title: str
    pipeline_class: str  # the diffusers pipeline class of the text-to-image model
    text_encoders: tuple[TextEncoderSpec, ...]
    context_dim: int  # width of the UNet's cross-attention context at reference size
    # Number of UNet cross-attention layers (None: it depends on the checkpoint).
    cross_attention_layers: int | None
    # "attn2": Transformer2DModel cross-attention (to_k/to_v); "added_kv": DeepFloyd IF's
    # AttnAddedKV attention layers (add_k_proj/add_v_proj).
    cross_attention_kind: str
    has_single_file_format: bool
    # LocoGen's locations from the ICML 2024 paper, per attribute, at reference size.
    known_locations: Mapping[str, LayerWindow] = field(default_factory=dict)
    notes: str = ""
    # Conditioning rules: whether the UNet context is several encoders' states joined by the
    # pipeline (then only the pipeline's own encode_prompt builds it), whether it also takes
    # pooled text embeddings and time ids, and whether the text encoder is causal (a prompt's
    # state at a token depends only on the tokens before it, so a prefix suffices).
    joins_text_encoders: bool = False
    pooled_text_embeds: bool = False
    time_ids: bool = False
    causal_text_encoder: bool = True

    @property
    def single_file_prefixes(self) -> dict[str, str]:
        """Where each text encoder lives in the original single file."""
        return {spec.component: spec.original_prefix for spec in self.text_encoders if spec.original_prefix}


FAMILIES: dict[str, Family] = {
    "sd1": Family(
        name="sd1",
        title="Stable Diffusion 1.x (and fine-tunes such as OpenJourney)",
        pipeline_class="StableDiffusionPipeline",
        text_encoders=(
            TextEncoderSpec("text_encoder", "clip", "CLIP ViT-L/14 text", 768,
                            "cond_stage_model.transformer."),
        ),
        context_dim=768,
        cross_attention_layers=16,
        cross_attention_kind="attn2",
        has_single_file_format=True,
        known_locations={
            "style": LayerWindow(8, 2),
            "object": LayerWindow(6, 2),
            "fact": LayerWindow(6, 2),
        },
    ),
    "sd2": Family(
        name="sd2",
        title="Stable Diffusion 2.x",
        pipeline_class="StableDiffusionPipeline",
        text_encoders=(
            TextEncoderSpec("text_encoder", "openclip", "OpenCLIP ViT-H/14 text", 1024,
                            "cond_stage_model.model."),
        ),
        context_dim=1024,
        cross_attention_layers=16,
        cross_attention_kind="attn2",
        has_single_file_format=True,
        known_locations={
            "style": LayerWindow(8, 3),
            "object": LayerWindow(8, 3),
            "fact": LayerWindow(7, 3),
        },
        notes="512-base (epsilon) and 768-v (v-prediction) share their keys; ModelSpec "
        "metadata or prediction_type= decides",
    ),
    "sdxl": Family(
        name="sdxl",
        title="Stable Diffusion XL (base)",
        pipeline_class="StableDiffusionXLPipeline",
        text_encoders=(
            TextEncoderSpec("text_encoder", "clip", "CLIP ViT-L/14 text", 768,
                            "conditioner.embedders.0.transformer."),
            TextEncoderSpec("text_encoder_2", "openclip", "OpenCLIP ViT-bigG/14 text", 1280,
                            "conditioner.embedders.1.model."),
        ),
        context_dim=2048,
        cross_attention_layers=70,
        cross_attention_kind="attn2",
        has_single_file_format=True,
        known_locations={
            "style": LayerWindow(45, 3),
            "fact": LayerWindow(45, 5),
            "object": LayerWindow(15, 5),
        },
        joins_text_encoders=True,
        pooled_text_embeds=True,
        time_ids=True,
    ),
    "if": Family(
        name="if",
        title="DeepFloyd IF (stage I)",
        pipeline_class="IFPipeline",
        text_encoders=(TextEncoderSpec("text_encoder", "t5", "T5-XXL encoder", 4096, None),),
        context_dim=4096,
        cross_attention_layers=None,
        cross_attention_kind="added_kv",
        has_single_file_format=False,
        known_locations={},  # the paper: locations depend on the prompt, not the attribute
        notes="no single-file format; LocoEdit does not work on IF (bidirectional T5 encoder)",
        causal_text_encoder=False,
    ),
}

FAMILY_NAMES = tuple(FAMILIES)


def family_of_pipeline(pipe) -> Family:
    """The conditioning rules of a diffusers pipeline object: the family whose pipeline class it
    is (SD-1 and SD-2 share theirs and their rules), else the one whose text encoders it holds."""
    name = type(pipe).__name__
    for family in FAMILIES.values():
        if family.pipeline_class == name:
            return family
    components = getattr(pipe, "components", {}) or {}
    held = {c for c, module in components.items() if module is not None}
    return max(FAMILIES.values(), key=lambda f: sum(spec.component in held for spec in f.text_encoders))


def known_location(family: str, attribute: str) -> LayerWindow | None:
    """The paper's layer window for ``attribute`` on ``family`` at reference size, if any."""
    return FAMILIES[family].known_locations.get(attribute)


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyDetection:
    family: str
    context_dim: int
    text_widths: tuple[int, ...]  # per text encoder, in the family's order
    matches_reference_widths: bool
    evidence: str  # one line: why we think so
    # From ModelSpec metadata or the checkpoint ("epsilon" | "v_prediction"), None if unknown.
    prediction_type: str | None = None


# Key names that identify the pieces of an original (LDM/SGM) single-file checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_CLIP_TOKENS = "transformer.text_model.embeddings.token_embedding.weight"
_OPENCLIP_TOKENS = "model.token_embedding.weight"
SD1_TEXT_KEY = "cond_stage_model." + _CLIP_TOKENS
SD2_TEXT_KEY = "cond_stage_model." + _OPENCLIP_TOKENS
SDXL_TEXT_KEY_0 = "conditioner.embedders.0." + _CLIP_TOKENS
SDXL_TEXT_KEY_1 = "conditioner.embedders.1." + _OPENCLIP_TOKENS
SDXL_REFINER_TEXT_KEY = "conditioner.embedders.0." + _OPENCLIP_TOKENS

# ModelSpec (https://github.com/Stability-AI/ModelSpec) architecture ids of full checkpoints.
_MODELSPEC_ARCHITECTURES = {
    "stable-diffusion-v1": ("sd1", None),
    "stable-diffusion-v2-512": ("sd2", "epsilon"),
    "stable-diffusion-v2-768-v": ("sd2", "v_prediction"),
    "stable-diffusion-xl-v1-base": ("sdxl", None),
}
_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}

_VALID_SINGLE_FILES = (
    "valid: an original single-file checkpoint of Stable Diffusion 1.x, 2.x or XL base "
    "(.safetensors or .ckpt), or a diffusers folder of sd1, sd2, sdxl or DeepFloyd IF stage I"
)


def _first_cross_attention_key(keys: Mapping[str, tuple[int, ...]]) -> str | None:
    for key in sorted(keys):
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return key
    return None


def _sample_keys(keys: Mapping[str, tuple[int, ...]], n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n]) or "none"


def detect_family(
    keys_and_shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str] | None = None,
    source: str = "checkpoint",
) -> FamilyDetection:
    """Tell the family of an original single-file checkpoint from its tensor names and shapes.

    ``keys_and_shapes`` maps every tensor name to its shape (no tensor data is needed; a state
    dict of tensors works too), and ``metadata`` is the safetensors ``__metadata__`` (ModelSpec
    keys are read when present). Raises ``UserError`` naming ``source`` for anything that is not
    a full sd1/sd2/sdxl checkpoint.
    """
    metadata = dict(metadata or {})
    keys = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in keys_and_shapes.items()}

    # Adapters and partial files first: they are common, and "unknown" would not help.
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.endswith(("-lora", "-textual-inversion")) or any(
        k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys
    ):
        raise UserError(f"{source}: this is a LoRA/textual-inversion adapter, not a full model "
                        f"checkpoint; {_VALID_SINGLE_FILES}")
    if not keys:
        raise UserError(f"{source}: the checkpoint contains no tensors; {_VALID_SINGLE_FILES}")

    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    clip_sd1 = SD1_TEXT_KEY in keys
    openclip_sd2 = SD2_TEXT_KEY in keys
    sdxl = SDXL_TEXT_KEY_0 in keys and SDXL_TEXT_KEY_1 in keys

    if not has_unet:
        if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
            raise UserError(f"{source}: this is a diffusers-layout UNet weight file, not a full "
                            f"single-file checkpoint; point editc at the diffusers folder that "
                            f"contains it ({_VALID_SINGLE_FILES})")
        raise UserError(f"{source}: no UNet weights (model.diffusion_model.*) — not a Stable "
                        f"Diffusion checkpoint (first keys: {_sample_keys(keys)}); "
                        f"{_VALID_SINGLE_FILES}")
    if SDXL_REFINER_TEXT_KEY in keys and not sdxl:
        raise UserError(f"{source}: this is an SD-XL refiner checkpoint, which editc does not "
                        f"edit (it has no CLIP-L text encoder); {_VALID_SINGLE_FILES}")
    conv_in = keys.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise UserError(f"{source}: the UNet takes {conv_in[1]} input channels (an inpainting or "
                        f"instruct-pix2pix model); editc edits text-to-image models with 4 latent "
                        f"channels; {_VALID_SINGLE_FILES}")

    found = [name for name, present in (("sd1", clip_sd1), ("sd2", openclip_sd2), ("sdxl", sdxl))
             if present]
    if len(found) != 1:
        what = "no known text encoder" if not found else "text encoders of " + " and ".join(found)
        raise UserError(f"{source}: unknown checkpoint layout — UNet present but {what} "
                        f"(expected cond_stage_model.transformer.* for sd1, "
                        f"cond_stage_model.model.* for sd2, conditioner.embedders.0/1 for sdxl); "
                        f"{_VALID_SINGLE_FILES}")
    family = found[0]

    attn_key = _first_cross_attention_key(keys)
    if attn_key is None:
        raise UserError(f"{source}: the UNet has no cross-attention layers (attn2.to_k); "
                        f"{_VALID_SINGLE_FILES}")
    context_dim = int(keys[attn_key][1])

    if family == "sd1":
        text_widths = (int(keys[SD1_TEXT_KEY][1]),)
        evidence = "OpenAI CLIP text encoder at cond_stage_model.transformer"
    elif family == "sd2":
        text_widths = (int(keys[SD2_TEXT_KEY][1]),)
        evidence = "OpenCLIP text encoder at cond_stage_model.model"
    else:
        text_widths = (int(keys[SDXL_TEXT_KEY_0][1]), int(keys[SDXL_TEXT_KEY_1][1]))
        evidence = "CLIP-L + OpenCLIP-bigG text encoders at conditioner.embedders.0/1"

    if sum(text_widths) != context_dim:
        raise UserError(f"{source}: inconsistent {family} checkpoint — the text encoder width "
                        f"{'+'.join(map(str, text_widths))} does not match the UNet's "
                        f"cross-attention context {context_dim} ({attn_key}); the file mixes "
                        f"parts of different models")
    evidence += f"; cross-attention context {context_dim}"

    prediction_type = None
    if architecture:
        if architecture not in _MODELSPEC_ARCHITECTURES:
            raise UserError(f"{source}: ModelSpec metadata says modelspec.architecture="
                            f"'{architecture}', which editc does not edit; "
                            f"{_VALID_SINGLE_FILES}")
        spec_family, prediction_type = _MODELSPEC_ARCHITECTURES[architecture]
        if spec_family != family:
            raise UserError(f"{source}: ModelSpec metadata says '{architecture}' ({spec_family}) "
                            f"but the tensors are {family} ({evidence}); fix the metadata")
        evidence += f"; ModelSpec architecture {architecture}"
    spec_prediction = metadata.get("modelspec.prediction_type")
    if spec_prediction in _MODELSPEC_PREDICTION:
        prediction_type = _MODELSPEC_PREDICTION[spec_prediction]

    reference = FAMILIES[family]
    matches = text_widths == tuple(t.width for t in reference.text_encoders)
    return FamilyDetection(family, context_dim, text_widths, matches, evidence, prediction_type)


def detect_family_from_diffusers(
    model_index: Mapping,
    unet_config: Mapping,
    text_encoder_configs: Mapping[str, Mapping],
    source: str = "model folder",
) -> FamilyDetection:
    """Tell the family of a diffusers pipeline from its configs.

    ``model_index`` is model_index.json (or a pipeline's ``.config``), ``unet_config`` the UNet's
    config, ``text_encoder_configs`` maps each present text-encoder component to its config.
    """
    pipeline_class = model_index.get("_class_name", "")
    context_dim = unet_config.get("cross_attention_dim")

    def width(component: str) -> int:
        config = text_encoder_configs[component]
        return int(config.get("hidden_size") or config.get("d_model"))

    if pipeline_class == "StableDiffusionPipeline":
        if "text_encoder" not in text_encoder_configs:
            raise UserError(f"{source}: StableDiffusionPipeline without a text_encoder")
        text_widths = (width("text_encoder"),)
        # Reference widths decide directly; a narrower model of the same layout (the toy model,
        # test fixtures) is SD-2-like when its UNet uses linear proj_in/proj_out (SD-2's
        # use_linear_in_transformer), SD-1-like otherwise: that is the single-file layout it
        # would be written in.
        if context_dim == 1024:
            family = "sd2"
        elif context_dim == 768:
            family = "sd1"
        else:
            family = "sd2" if unet_config.get("use_linear_projection") else "sd1"
        evidence = f"StableDiffusionPipeline; cross-attention context {context_dim}"
    elif pipeline_class == "StableDiffusionXLPipeline":
        if "text_encoder" not in text_encoder_configs or "text_encoder_2" not in text_encoder_configs:
            raise UserError(f"{source}: StableDiffusionXLPipeline needs text_encoder and "
                            f"text_encoder_2 (an SD-XL refiner, which has only the second, is not "
                            f"supported)")
        family = "sdxl"
        text_widths = (width("text_encoder"), width("text_encoder_2"))
        evidence = f"StableDiffusionXLPipeline; cross-attention context {context_dim}"
    elif pipeline_class == "IFPipeline":
        if unet_config.get("encoder_hid_dim") is None:
            raise UserError(f"{source}: IFPipeline whose UNet has no encoder_hid_dim (no T5 "
                            f"text projection); not a DeepFloyd IF stage I model")
        family = "if"
        text_widths = (width("text_encoder"),) if "text_encoder" in text_encoder_configs else (
            int(unet_config["encoder_hid_dim"]),)
        if text_widths[0] != unet_config["encoder_hid_dim"]:
            raise UserError(f"{source}: inconsistent IF model — T5 width {text_widths[0]} but the "
                            f"UNet's encoder_hid_dim is {unet_config['encoder_hid_dim']}")
        # The added K/V projections read the T5 states after the UNet's encoder_hid_proj, so
        # their context is the UNet's cross_attention_dim.
        evidence = (f"IFPipeline; T5 width {text_widths[0]} projected by encoder_hid_proj to "
                    f"{context_dim}")
    elif pipeline_class.startswith("IF"):
        raise UserError(f"{source}: {pipeline_class} is a DeepFloyd IF super-resolution stage; "
                        f"editc edits stage I (IFPipeline)")
    else:
        raise UserError(f"{source}: model_index.json names '{pipeline_class or '(none)'}'; editc "
                        f"supports StableDiffusionPipeline (sd1, sd2), StableDiffusionXLPipeline "
                        f"(sdxl) and IFPipeline (DeepFloyd IF stage I)")

    if family != "if" and sum(text_widths) != context_dim:
        raise UserError(f"{source}: inconsistent {family} model — text encoder width "
                        f"{'+'.join(map(str, text_widths))} but the UNet's cross_attention_dim "
                        f"is {context_dim}")
    reference = FAMILIES[family]
    matches = text_widths == tuple(t.width for t in reference.text_encoders)
    return FamilyDetection(family, int(context_dim), text_widths, matches, evidence)
