"""The model families editc knows, as data, and how to tell them apart.

A *family* fixes the block layout of the UNet, the text encoder(s) and the names of every tensor
in both checkpoint layouts (a diffusers folder and the original single file that A1111/ComfyUI
load). Widths may differ from the reference model: the embedded toy model and the tiny test
fixtures have SD-1.5's layout with narrow layers, and they are still ``sd1``. What the family
decides is which names, conversions and paper results apply; ``matches_reference_widths`` says
whether the paper's known layer locations (measured on the full-size models) may be used.

Detection is done here from keys and shapes, never delegated: diffusers' own single-file
detection silently falls back to SD-1 ("v1") for anything it does not recognise.

Everything that differs between families is reached through the :class:`Family` object (its
data and hooks): configs inferred from a single file, key layouts, single-file and ModelSpec
tables, ONNX graph inputs and outputs, planning rules. No other module compares a family's
name; a new family is one ``Family(...)`` passed to :func:`register_family`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    # A CLIPTextModelWithProjection (pooled embeds: SD-XL's second encoder); its single-file
    # layout stores the projection, whose width the config takes.
    with_projection: bool = False
    # The diffusers encoder's layer count at reference size when the original tower has one
    # more block that nothing reads (SD-2 conditions on the penultimate layer, diffusers drops
    # the 24th): a single file written back carries that block as a pass-through.
    pass_through_after: int | None = None

    @property
    def token_key(self) -> str | None:
        """The single-file key of its token embedding: what tells the encoder is there."""
        if self.original_prefix is None:
            return None
        if self.kind == "clip":
            return self.original_prefix + "text_model.embeddings.token_embedding.weight"
        return self.original_prefix + "token_embedding.weight"


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
    # Why no method can edit it (planning refuses every edit with this), None when editable.
    no_edit_reason: str | None = None
    # -- configs --
    shipped_configs: str = ""  # its folder under compiler/assets/configs ("": its name)
    needs_vae: bool = True
    # One head count at every UNet level (SD-1: 8); None: width // 64 per level.
    unet_heads: int | None = None
    # -- the original single file (empty: the family has none) --
    single_file_components: tuple[str, ...] = ()
    single_file_evidence: str = ""  # one line for `inspect`: where its text encoders sit
    # ModelSpec architecture ids -> the prediction type each implies (None: any). Written: the
    # first whose prediction type matches, else the last; read: the family and prediction type.
    modelspec_architectures: Mapping[str, str | None] = field(default_factory=dict)
    modelspec_implementation: str | None = None
    modelspec_guessed_architecture: str | None = None  # written when the prediction type is a guess
    native_resolution: Mapping[str | None, int] = field(default_factory=dict)  # by prediction type
    # Variants that share their keys and differ in prediction type (SD-2's 512-base and 768-v):
    # the type told by a .ckpt's global_step, the guess otherwise, and the config changes of each.
    prediction_type_ambiguous: bool = False
    prediction_type_by_global_step: Mapping[int, str] = field(default_factory=dict)
    prediction_type_guess: str | None = None
    prediction_type_configs: Mapping[str, Mapping[str, Mapping]] = field(default_factory=dict)
    # -- ONNX --
    onnx_pipeline_class: str | None = None  # the ORT pipeline's class name; None: no ONNX export
    onnx_vae_float32: bool = False  # the VAE overflows in float16 (SD-XL's)
    # -- detection of a diffusers folder beyond its pipeline class (hook) --
    # ``(model_index, unet_config, text_configs) -> bool``; the newest registered family whose
    # pipeline class and hook accept a folder wins, so a variant outranks its parent.
    claims_diffusers: Callable[[Mapping, Mapping, Mapping], bool] | None = None

    @property
    def has_single_file_format(self) -> bool:
        return bool(self.single_file_components)

    def modelspec_architecture(self, prediction_type: str | None) -> str:
        if not self.modelspec_architectures:
            raise UserError(f"{self.name} has no single-file format (valid: {', '.join(single_file_families())})")
        matching = [a for a, p in self.modelspec_architectures.items() if p is not None and p == prediction_type]
        return matching[0] if matching else list(self.modelspec_architectures)[-1]

    def resolution(self, prediction_type: str | None) -> int | None:
        return self.native_resolution.get(prediction_type, self.native_resolution.get(None))

    def __post_init__(self) -> None:
        if not self.shipped_configs:
            object.__setattr__(self, "shipped_configs", self.name)

    def text_encoder(self, component: str) -> TextEncoderSpec:
        return next(t for t in self.text_encoders if t.component == component)

    @property
    def single_file_prefixes(self) -> dict[str, str]:
        """Where each text encoder lives in the original single file."""
        return {spec.component: spec.original_prefix for spec in self.text_encoders if spec.original_prefix}


def _claims_sd2(model_index: Mapping, unet_config: Mapping, text_configs: Mapping) -> bool:
    """SD-1 and SD-2 share their pipeline class. Reference widths decide directly; a narrower
    model of the same layout (the toy model, test fixtures) is SD-2-like when its UNet uses
    linear proj_in/proj_out (SD-2's use_linear_in_transformer), SD-1-like otherwise: that is
    the single-file layout it would be written in."""
    context = unet_config.get("cross_attention_dim")
    if context in (768, 1024):
        return context == 1024
    return bool(unet_config.get("use_linear_projection"))


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
        unet_heads=8,  # ldm config num_heads: 8 at every level
        single_file_components=("unet", "vae", "text_encoder"),
        single_file_evidence="OpenAI CLIP text encoder at cond_stage_model.transformer",
        modelspec_architectures={"stable-diffusion-v1": None},
        modelspec_implementation="https://github.com/CompVis/stable-diffusion",
        native_resolution={None: 512},
        onnx_pipeline_class="ORTStableDiffusionPipeline",
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
                            "cond_stage_model.model.", pass_through_after=23),
        ),
        context_dim=1024,
        cross_attention_layers=16,
        cross_attention_kind="attn2",
        single_file_components=("unet", "vae", "text_encoder"),
        single_file_evidence="OpenCLIP text encoder at cond_stage_model.model",
        modelspec_architectures={"stable-diffusion-v2-512": "epsilon",
                                 "stable-diffusion-v2-768-v": "v_prediction"},
        modelspec_implementation="https://github.com/Stability-AI/stablediffusion",
        modelspec_guessed_architecture="stable-diffusion-v2",
        native_resolution={"v_prediction": 768, None: 512},
        prediction_type_ambiguous=True,
        prediction_type_by_global_step={875000: "epsilon"},  # Stability's 512-base release
        prediction_type_guess="v_prediction",
        claims_diffusers=_claims_sd2,
        prediction_type_configs={"epsilon": {"unet": {"sample_size": 64}, "vae": {"sample_size": 512}},
                                 "v_prediction": {}},
        onnx_pipeline_class="ORTStableDiffusionPipeline",
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
                            "conditioner.embedders.1.model.", with_projection=True),
        ),
        context_dim=2048,
        cross_attention_layers=70,
        cross_attention_kind="attn2",
        single_file_components=("unet", "vae", "text_encoder", "text_encoder_2"),
        single_file_evidence="CLIP-L + OpenCLIP-bigG text encoders at conditioner.embedders.0/1",
        modelspec_architectures={"stable-diffusion-xl-v1-base": None},
        modelspec_implementation="https://github.com/Stability-AI/generative-models",
        native_resolution={None: 1024},
        onnx_pipeline_class="ORTStableDiffusionXLPipeline",
        onnx_vae_float32=True,  # SD-XL's VAE overflows in float16
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
        known_locations={},  # the paper: locations depend on the prompt, not the attribute
        notes="no single-file format; LocoEdit does not work on IF (bidirectional T5 encoder)",
        causal_text_encoder=False,
        no_edit_reason="DeepFloyd IF has no editable location: its T5 encoder is bidirectional, so the "
        "concept is not concentrated in its last token and LocoEdit fails there (Basu et al., ICML 2024)",
        needs_vae=False,
    ),
}

FAMILY_NAMES = tuple(FAMILIES)


def register_family(family: Family) -> Family:
    """Add (or replace) a family: the one line a new family needs besides its data."""
    global FAMILY_NAMES
    FAMILIES[family.name] = family
    FAMILY_NAMES = tuple(FAMILIES)
    return family


def single_file_families() -> list[str]:
    return [f.name for f in FAMILIES.values() if f.has_single_file_format]


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
SDXL_REFINER_TEXT_KEY = "conditioner.embedders.0.model.token_embedding.weight"


def _modelspec_architectures() -> dict[str, tuple[str, str | None]]:
    """ModelSpec architecture id -> (family, prediction type), from every family's table."""
    return {architecture: (family.name, prediction)
            for family in FAMILIES.values() for architecture, prediction in family.modelspec_architectures.items()}


_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}



def _valid_single_files() -> str:
    return (f"valid: an original single-file checkpoint of {', '.join(single_file_families())} "
            f"(.safetensors or .ckpt), or a diffusers folder of {', '.join(FAMILIES)}")


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
                        f"checkpoint; {_valid_single_files()}")
    if not keys:
        raise UserError(f"{source}: the checkpoint contains no tensors; {_valid_single_files()}")

    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    # A family is there when every one of its text encoders' token embeddings is.
    found = [f.name for f in FAMILIES.values() if f.has_single_file_format
             and all(spec.token_key in keys for spec in f.text_encoders)]
    sdxl_like = any(len(FAMILIES[f].text_encoders) > 1 for f in found)

    if not has_unet:
        if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
            raise UserError(f"{source}: this is a diffusers-layout UNet weight file, not a full "
                            f"single-file checkpoint; point editc at the diffusers folder that "
                            f"contains it ({_valid_single_files()})")
        raise UserError(f"{source}: no UNet weights (model.diffusion_model.*) — not a Stable "
                        f"Diffusion checkpoint (first keys: {_sample_keys(keys)}); "
                        f"{_valid_single_files()}")
    if SDXL_REFINER_TEXT_KEY in keys and not sdxl_like:
        raise UserError(f"{source}: this is an SD-XL refiner checkpoint, which editc does not "
                        f"edit (it has no CLIP-L text encoder); {_valid_single_files()}")
    conv_in = keys.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise UserError(f"{source}: the UNet takes {conv_in[1]} input channels (an inpainting or "
                        f"instruct-pix2pix model); editc edits text-to-image models with 4 latent "
                        f"channels; {_valid_single_files()}")

    if len(found) > 1:  # one family's encoders may be part of another's: the fullest match
        most = max(len(FAMILIES[f].text_encoders) for f in found)
        found = [f for f in found if len(FAMILIES[f].text_encoders) == most]
    if len(found) != 1:
        what = "no known text encoder" if not found else "text encoders of " + " and ".join(found)
        expected = ", ".join(f"{'/'.join(spec.original_prefix for spec in f.text_encoders)}* for {f.name}"
                             for f in FAMILIES.values() if f.has_single_file_format)
        raise UserError(f"{source}: unknown checkpoint layout — UNet present but {what} "
                        f"(expected {expected}); {_valid_single_files()}")
    family = found[0]

    attn_key = _first_cross_attention_key(keys)
    if attn_key is None:
        raise UserError(f"{source}: the UNet has no cross-attention layers (attn2.to_k); "
                        f"{_valid_single_files()}")
    context_dim = int(keys[attn_key][1])

    text_widths = tuple(int(keys[spec.token_key][1]) for spec in FAMILIES[family].text_encoders)
    evidence = FAMILIES[family].single_file_evidence or "text encoders at " + ", ".join(
        spec.original_prefix.rstrip(".") for spec in FAMILIES[family].text_encoders)

    if sum(text_widths) != context_dim:
        raise UserError(f"{source}: inconsistent {family} checkpoint — the text encoder width "
                        f"{'+'.join(map(str, text_widths))} does not match the UNet's "
                        f"cross-attention context {context_dim} ({attn_key}); the file mixes "
                        f"parts of different models")
    evidence += f"; cross-attention context {context_dim}"

    prediction_type = None
    if architecture:
        architectures = _modelspec_architectures()
        if architecture not in architectures:
            raise UserError(f"{source}: ModelSpec metadata says modelspec.architecture="
                            f"'{architecture}', which editc does not edit; "
                            f"{_valid_single_files()}")
        spec_family, prediction_type = architectures[architecture]
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

    candidates = [f for f in reversed(list(FAMILIES.values())) if f.pipeline_class == pipeline_class]
    chosen = next((f for f in candidates if f.claims_diffusers is None
                   or f.claims_diffusers(model_index, unet_config, text_encoder_configs)), None)
    if chosen is None:
        if pipeline_class.startswith("IF"):
            raise UserError(f"{source}: {pipeline_class} is a DeepFloyd IF super-resolution stage; "
                            f"editc edits stage I (IFPipeline)")
        known = ", ".join(f"{c} ({', '.join(f.name for f in FAMILIES.values() if f.pipeline_class == c)})"
                          for c in dict.fromkeys(f.pipeline_class for f in FAMILIES.values()))
        raise UserError(f"{source}: model_index.json names '{pipeline_class or '(none)'}'; editc "
                        f"supports {known}")
    family = chosen.name
    if chosen.cross_attention_kind == "added_kv":  # IF: T5 states projected by encoder_hid_proj
        if unet_config.get("encoder_hid_dim") is None:
            raise UserError(f"{source}: {pipeline_class} whose UNet has no encoder_hid_dim (no T5 "
                            f"text projection); not a DeepFloyd IF stage I model")
        text_widths = (width("text_encoder"),) if "text_encoder" in text_encoder_configs else (
            int(unet_config["encoder_hid_dim"]),)
        if text_widths[0] != unet_config["encoder_hid_dim"]:
            raise UserError(f"{source}: inconsistent {family} model — T5 width {text_widths[0]} but the "
                            f"UNet's encoder_hid_dim is {unet_config['encoder_hid_dim']}")
        # The added K/V projections read the T5 states after the UNet's encoder_hid_proj, so
        # their context is the UNet's cross_attention_dim.
        evidence = (f"{pipeline_class}; T5 width {text_widths[0]} projected by encoder_hid_proj to "
                    f"{context_dim}")
    else:
        components = [spec.component for spec in chosen.text_encoders]
        if any(c not in text_encoder_configs for c in components):
            refiner = (" (an SD-XL refiner, which has only the second, is not supported)"
                       if len(components) > 1 else "")
            raise UserError(f"{source}: {pipeline_class} needs {' and '.join(components)}{refiner}")
        text_widths = tuple(width(c) for c in components)
        evidence = f"{pipeline_class}; cross-attention context {context_dim}"

    if chosen.cross_attention_kind != "added_kv" and sum(text_widths) != context_dim:
        raise UserError(f"{source}: inconsistent {family} model — text encoder width "
                        f"{'+'.join(map(str, text_widths))} but the UNet's cross_attention_dim "
                        f"is {context_dim}")
    reference = FAMILIES[family]
    matches = text_widths == tuple(t.width for t in reference.text_encoders)
    return FamilyDetection(family, int(context_dim), text_widths, matches, evidence)
