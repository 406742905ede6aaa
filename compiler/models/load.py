"""Loading models offline: diffusers folders and original single files, every family.

Two steps, so that a bad checkpoint fails fast and clearly, before any weights are read:

1. ``inspect_source(path)`` reads only headers and configs: it finds the format, detects the
   family from keys and shapes (never trusting diffusers' silent "v1" fallback), infers the
   component configs of a single file from its shapes, and checks that every tensor the
   family's layout needs is present with the right shape. Anything wrong is a ``UserError``
   (exit 2, one line) naming the path and what would be valid.
2. ``load_model(path)`` then builds the diffusers pipeline: ``from_pretrained`` for a folder,
   ``from_single_file`` with a local config folder (``compiler.models.configs``) for a single
   file, always with ``local_files_only=True``.

Components that editing and generation do not need (safety checker, feature extractor, IF's
watermarker, image encoder) are not loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler.errors import UserError
from compiler.models.checkpoint import (SingleFileHeader, editc_metadata, load_ckpt_state_dict,
                                        read_safetensors_header, read_single_file, torch_dtype)
from compiler.models.configs import (CONFIG_METADATA_KEY, apply_config_metadata,
                                     infer_single_file_configs)
from compiler.models.families import (FAMILIES, VAE_PREFIX, FamilyDetection, detect_family,
                                      detect_family_from_diffusers)
from compiler.models.hashing import file_sha256, folder_sha256
from compiler.models.layout import single_file_components, component_to_original
from compiler.models.registry import Registry, registry_from_components, text_layer0


TOY_PIPELINE = Path(__file__).resolve().parents[1] / "toy" / "weights" / "pipeline"

# Components a pipeline may list that editing and generation never need.
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder", "watermarker")
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_VALID = ("valid: 'toy', a diffusers folder (sd1, sd2, sdxl, DeepFloyd IF stage I), an "
          "original single file (.safetensors/.ckpt) of sd1, sd2 or sdxl, or a Hugging Face "
          "cache folder or repo id (org/name) in the local cache")


@dataclass
class ModelSource:
    """What a model path holds, found from headers and configs alone."""

    path: Path
    format: str  # "diffusers" | "single-file"
    family: str
    detection: FamilyDetection
    configs: dict[str, dict]  # "model_index" and each component's config
    weight_files: list[Path]  # the files whose bytes are the model (hashed)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    prediction_type: str | None = None
    variant: str | None = None  # diffusers weight variant ("fp16") when only variants exist
    notes: list[str] = field(default_factory=list)
    stored_dtype: torch.dtype | None = None  # of the UNet's weights in the checkpoint
    # True when nothing recorded the prediction type (an SD-2 single file without metadata):
    # exports must not write it as a fact
    prediction_type_guessed: bool = False

    @property
    def editc_metadata(self) -> dict[str, str]:
        """Provenance an editc export wrote into the weights (``editc.*`` keys)."""
        return editc_metadata(self.metadata)


@dataclass
class LoadedModel:
    family: str
    pipeline: object  # a diffusers DiffusionPipeline
    source_path: Path
    source_format: str  # "diffusers" | "single-file"
    model_hash: str  # sha256 (see compiler.models.hashing)
    registry: Registry
    dtype: torch.dtype  # in memory
    stored_dtype: torch.dtype | None = None  # of the UNet's weights in the checkpoint
    prediction_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prediction_type_guessed: bool = False

    # What compile reads: the same calls on a lazily read model (``compiler.models.selective``).
    pipeline_loaded = True
    policy = None  # the compiler.device.DevicePolicy it was loaded under, if one chose

    @property
    def export_pipeline(self):
        """What exporters trace (ONNX): the one pipeline held (see ``SelectiveModel``)."""
        return self.pipeline

    def text_encoder(self, component: str = "text_encoder") -> torch.nn.Module:
        return getattr(self.pipeline, component)

    def tokenizer_for(self, component: str = "text_encoder"):
        return getattr(self.pipeline, component.replace("text_encoder", "tokenizer"))

    def read_tensors(self, qualified_names) -> dict[str, torch.Tensor]:
        """Parameters by qualified name (``unet/...``), detached, as held in memory."""
        out = {}
        for qualified in qualified_names:
            component, _, parameter = qualified.partition("/")
            out[qualified] = getattr(self.pipeline, component).get_parameter(parameter).detach()
        return out


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def resolve_model_path(path_or_toy: str | os.PathLike) -> Path:
    if str(path_or_toy) == "toy":
        if not (TOY_PIPELINE / "model_index.json").is_file():
            raise UserError(f"the embedded toy model's weights are missing ({TOY_PIPELINE}); "
                            f"`make train-toy` builds them")
        return TOY_PIPELINE
    from compiler.models.hub_cache import resolve_hub_model

    hub = resolve_hub_model(path_or_toy)  # a Hugging Face cache folder or repo id, offline
    if hub is not None:
        return hub
    path = Path(path_or_toy).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; {_VALID}")
    return path


# --------------------------------------------------------------------------------------------
# Meta-device components: tensor names and shapes without memory or weights
# --------------------------------------------------------------------------------------------


def _component_class(model_index: dict, component: str, source: str = "model"):
    library, class_name = model_index[component]
    if library == "diffusers":
        import diffusers.models as module
    elif library == "transformers":
        import transformers as module
    else:
        raise UserError(f"{source}: component {component} comes from '{library}'; editc loads "
                        f"diffusers and transformers components")
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"{source}: component {component} is a {library}.{class_name}, which "
                        f"{library} does not have")
    return cls


def build_meta(configs: dict, component: str, source: str = "model") -> torch.nn.Module:
    cls = _component_class(configs["model_index"], component, source)
    config = configs[component]
    try:
        with torch.device("meta"):
            if hasattr(cls, "from_config") and not hasattr(cls, "config_class"):
                return cls.from_config(config)  # diffusers
            return cls(cls.config_class.from_dict(config))  # transformers
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(f"{source}: the {component} config does not describe a valid "
                        f"{cls.__name__} ({first[:200]})") from None


def meta_components(source: ModelSource) -> dict[str, torch.nn.Module]:
    """The source's model components instantiated on the meta device (no weights)."""
    return {c: build_meta(source.configs, c, str(source.path))
            for c in MODEL_COMPONENTS if c in source.configs}


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _check_single_file_tensors(header: SingleFileHeader, family: str, configs: dict) -> None:
    """Every tensor the family's layout needs is in the file, with the right shape."""
    missing, wrong = [], []
    for component in single_file_components(family):
        meta = build_meta(configs, component, str(header.path))
        config = configs[component] if component in ("unet", "vae") else {}
        expected = component_to_original(family, component, meta.state_dict(), config)
        for name, tensor in expected.items():
            shape = header.shapes.get(name)
            if shape is None:
                missing.append(name)
            elif tuple(shape) != tuple(tensor.shape):
                wrong.append(f"{name} is {list(shape)}, expected {list(tensor.shape)}")
    if missing:
        raise UserError(f"{header.path}: incomplete {family} checkpoint — {_count(missing, 'tensor')} "
                        f"of its layout missing (e.g. {', '.join(sorted(missing)[:2])}); the "
                        f"file is truncated, partial (UNet-only?) or not {family}")
    if wrong:
        raise UserError(f"{header.path}: inconsistent {family} checkpoint — {_count(wrong, 'tensor')} "
                        f"with unexpected shapes (e.g. {wrong[0]})")


def _inspect_single_file(path: Path, prediction_type: str | None) -> ModelSource:
    header = read_single_file(path)
    detection = detect_family(header.shapes, header.metadata, source=str(path))
    family = detection.family
    if not any(k.startswith(VAE_PREFIX) for k in header.shapes):
        raise UserError(f"{path}: no VAE weights ({VAE_PREFIX}*) — a UNet-only or partial "
                        f"{family} file; editc needs a full checkpoint (UNet, VAE, text encoder)")
    notes = []
    stored_configs = header.metadata.get(CONFIG_METADATA_KEY)
    # Prediction type, most specific first: the caller, configs editc stored in the file,
    # ModelSpec metadata, and for SD-2 (whose two variants share their keys) the global_step of
    # Stability's 512-base release, else 768-v.
    guess = prediction_type or detection.prediction_type
    guessed = False
    rules = FAMILIES[family]
    if guess is None and rules.prediction_type_ambiguous and not stored_configs:
        if header.global_step in rules.prediction_type_by_global_step:
            guess = rules.prediction_type_by_global_step[header.global_step]
            notes.append(f"prediction type: {guess} (from global_step {header.global_step})")
        else:
            guess = rules.prediction_type_guess
            guessed = True
            notes.append("prediction type not recorded in the file: assumed v_prediction "
                         "(SD-2.x 768-v, a guess); pass --prediction-type epsilon for a 512-base model")
    try:
        configs = infer_single_file_configs(detection, header.shapes, guess)
    except KeyError as err:
        raise UserError(f"{path}: incomplete {family} checkpoint — tensor {err} of its layout is "
                        f"missing; the file is truncated, partial or not {family}") from None
    if stored_configs:
        configs = apply_config_metadata(configs, stored_configs, source=str(path))
        notes.append(f"component configs from the file's {CONFIG_METADATA_KEY} metadata")
    elif not detection.matches_reference_widths:
        notes.append(f"text widths {detection.text_widths} are not the reference {family} model's: "
                     f"component configs inferred from tensor shapes")
    if prediction_type is not None:
        configs["scheduler"]["prediction_type"] = prediction_type
    _check_single_file_tensors(header, family, configs)
    first_key = next(k for k in sorted(header.shapes) if k.endswith("attn2.to_k.weight"))
    return ModelSource(path, "single-file", family, detection, configs, [path], header.metadata,
                       configs["scheduler"].get("prediction_type", "epsilon"), None, notes,
                       stored_dtype=torch_dtype(header.dtypes[first_key]), prediction_type_guessed=guessed)


# --------------------------------------------------------------------------------------------
# Diffusers folders
# --------------------------------------------------------------------------------------------

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: unreadable {what} ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return data


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """A component's weight files, as diffusers/transformers pick them: one file
    (``model.safetensors``, ``model.fp16.safetensors``) or the shards an index lists
    (``model.safetensors.index.json``, or ``model.safetensors.index.fp16.json`` for a variant)."""
    for ext in ("safetensors", "bin"):
        for stem in _WEIGHT_NAMES:
            single = folder / (f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}")
            if single.is_file():
                return [single]
            indexes = ([folder / f"{stem}.{ext}.index.{variant}.json",
                        folder / f"{stem}.{variant}.{ext}.index.json"] if variant
                       else [folder / f"{stem}.{ext}.index.json"])
            for index in indexes:
                if index.is_file():
                    weight_map = _read_json(index, "weight index").get("weight_map", {})
                    if not isinstance(weight_map, dict):
                        raise UserError(f"{index}: weight_map is not an object mapping tensor names to "
                                        f"shard file names; the index is corrupt")
                    files = [folder / _shard_name(index, s) for s in sorted(set(map(str, weight_map.values())))]
                    for f in files:
                        if not f.is_file():
                            raise UserError(f"{f}: shard listed in {index.name} is missing")
                    return files
    return []


def _shard_name(index: Path, name: str) -> str:
    """A shard named in a weight index: a plain file name beside the index (what diffusers and
    transformers write), never a path that could leave the model folder."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise UserError(f"{index}: shard {name[:80]!r} is not a file name in {index.parent.name}/ "
                        f"(a shard path may not leave the component folder); fix the weight_map entry")
    return name


_TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "added_tokens.json", "vocab.json")


def _check_tokenizer_files(folder: Path) -> None:
    """The tokenizer's JSON files parse (the tokenizer libraries would fail with a traceback)."""
    for name in _TOKENIZER_JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
                raise UserError(f"{path}: the tokenizer file is not valid JSON ({err.__class__.__name__}); "
                                f"restore it from the model's original files") from None
            if not isinstance(data, dict):
                raise UserError(f"{path}: the tokenizer file is not a JSON object; restore it from the "
                                f"model's original files")


_VARIANT_FILE = re.compile(r"(?:%s)(?:\.(\w+)\.(?:safetensors|bin)|\.(?:safetensors|bin)\.index\.(\w+)\.json)"
                           % "|".join(_WEIGHT_NAMES))


def _variants(folder: Path) -> set[str]:
    """Weight variants present in a component folder ("fp16", ...)."""
    found = set()
    for f in folder.iterdir():
        if m := _VARIANT_FILE.fullmatch(f.name):
            found.add(m[1] or m[2])
    return found


def _tensor_table(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Shape and dtype of every tensor in a component's weight files."""
    table: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            header, _ = read_safetensors_header(f)
            table.update({k: (tuple(v["shape"]), torch_dtype(v["dtype"])) for k, v in header.items()})
        else:
            tensors, _ = load_ckpt_state_dict(f)
            table.update({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    return table


def _check_other_safetensors(folder: Path, checked: set[Path]) -> None:
    """Every other safetensors file in the folder (a safety checker, an image encoder, another
    variant's weights): never read, but an output folder links them, so a damaged header
    (overlapping or unindexed bytes, ranges outside the file) is refused here too."""
    for path in sorted(folder.rglob("*.safetensors")):
        if path not in checked and path.is_file():
            read_safetensors_header(path)


def _check_folder_tensors(folder: Path, configs: dict, files: dict[str, list[Path]],
                          family: str) -> torch.dtype | None:
    """The UNet (what editc edits) must hold exactly the tensors its config implies; the text
    encoders at least the layer-0 projection editing reads. (Text-encoder files differ in
    naming across transformers versions and tied weights, so they are not checked tensor by
    tensor; transformers itself checks them on load.)"""
    for component, component_files in files.items():  # every header: catches truncated files
        if component not in ("unet", *(t.component for t in FAMILIES[family].text_encoders)):
            _tensor_table(component_files)
    unet_table = _tensor_table(files["unet"])
    unet_shapes = {k: shape for k, (shape, _) in unet_table.items()}
    expected = build_meta(configs, "unet", str(folder)).state_dict()
    missing = [n for n in expected if n not in unet_shapes]
    if missing:
        raise UserError(f"{folder / 'unet'}: {_count(missing, 'UNet tensor')} that unet/config.json "
                        f"implies missing from the weights (e.g. {sorted(missing)[0]}); the "
                        f"weights are truncated or do not belong to this config")
    wrong = [n for n, t in expected.items() if tuple(unet_shapes[n]) != tuple(t.shape)]
    if wrong:
        n = wrong[0]
        raise UserError(f"{folder / 'unet'}: {_count(wrong, 'UNet tensor')} not matching unet/config.json "
                        f"(e.g. {n} is {list(unet_shapes[n])}, expected {list(expected[n].shape)})")
    for spec in FAMILIES[family].text_encoders:
        if spec.component not in files:
            continue
        names = {n.removeprefix("text_model.") for n in _tensor_table(files[spec.component])}
        meta = build_meta(configs, spec.component, str(folder))
        layer0 = text_layer0(family, spec.component, meta)
        if layer0.weight.removeprefix("text_model.") not in names:
            raise UserError(f"{folder / spec.component}: the weights lack {layer0.weight}; not a "
                            f"{spec.name} encoder matching its config")
    first_key = next(k for k in sorted(expected) if k.endswith((".to_k.weight", ".add_k_proj.weight")))
    return unet_table[first_key][1]


def _inspect_diffusers(folder: Path) -> ModelSource:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        hint = (" (this looks like a single component's folder; point at the pipeline folder "
                "above it)" if (folder / "config.json").is_file() else "")
        raise UserError(f"{folder}: not a diffusers pipeline folder — no model_index.json{hint}; "
                        f"{_VALID}")
    model_index = _read_json(index_path, "model_index.json")
    configs: dict[str, dict] = {"model_index": model_index}
    needed = [name for name, value in model_index.items()
              if not name.startswith("_") and isinstance(value, list) and len(value) == 2
              and value[0] is not None and name not in SKIPPED_COMPONENTS]
    for name in ("unet", "scheduler", "tokenizer", "text_encoder"):
        if name not in needed:
            raise UserError(f"{index_path}: the pipeline has no '{name}' component; editc needs "
                            f"a complete text-to-image pipeline ({_VALID})")

    for name in needed:
        if not (folder / name).is_dir():
            raise UserError(f"{folder}: component '{name}' listed in model_index.json is missing "
                            f"(no {name}/ folder); copy the complete pipeline")
    models = [name for name in needed if name in MODEL_COMPONENTS]
    for name in models:
        _component_class(model_index, name, str(index_path))
    # Weight variant: none when every model component has default weights; else the one
    # variant the others have (an fp16-only download). As with diffusers' variant=, a component
    # without variant files then falls back to its default weights.
    variant = None
    if any(not _weight_files(folder / name, None) for name in models):
        variants = set().union(*(_variants(folder / name) for name in models))
        if len(variants) == 1:
            variant = variants.pop()
    files: dict[str, list[Path]] = {}
    for name in needed:
        sub = folder / name
        if name == "scheduler":
            configs[name] = _read_json(sub / "scheduler_config.json", "scheduler config")
        elif name.startswith("tokenizer"):
            if not any((sub / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model",
                                                     "tokenizer_config.json")):
                raise UserError(f"{sub}: no tokenizer files (tokenizer_config.json, vocab.json, "
                                f"tokenizer.json or spiece.model)")
            _check_tokenizer_files(sub)
        elif name in MODEL_COMPONENTS:
            configs[name] = _read_json(sub / "config.json", f"{name} config")
            found = (_weight_files(sub, variant) if variant else []) or _weight_files(sub, None)
            if not found:
                raise UserError(f"{sub}: no weights (expected diffusion_pytorch_model.safetensors "
                                f"or model.safetensors); the folder is incomplete")
            files[name] = found

    text_configs = {c: configs[c] for c in ("text_encoder", "text_encoder_2") if c in configs}
    detection = detect_family_from_diffusers(model_index, configs["unet"], text_configs,
                                             source=str(folder))
    family = detection.family
    if FAMILIES[family].needs_vae and "vae" not in files:
        raise UserError(f"{index_path}: the pipeline has no 'vae' component; {family} needs one")
    stored_dtype = _check_folder_tensors(folder, configs, files, family)
    _check_other_safetensors(folder, {f for component_files in files.values() for f in component_files})

    metadata: dict[str, str] = {}
    for component_files in files.values():
        for f in component_files:
            if f.suffix == ".safetensors":
                metadata.update(read_safetensors_header(f)[1])
    notes = []
    if not detection.matches_reference_widths:
        notes.append(f"text widths {detection.text_widths} are not the reference {family} "
                     f"model's: the papers' layer locations do not apply")
    prediction_type = configs["scheduler"].get("prediction_type", "epsilon")
    weight_files = [f for c in sorted(files) for f in files[c]]
    return ModelSource(folder, "diffusers", family, detection, configs, weight_files, metadata,
                       prediction_type, variant, notes, stored_dtype=stored_dtype)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def inspect_source(path_or_toy: str | os.PathLike, prediction_type: str | None = None) -> ModelSource:
    """Validate a model path and describe it, reading headers and configs only."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise UserError(f"prediction_type '{prediction_type}' is not one of epsilon, v_prediction")
    path = resolve_model_path(path_or_toy)
    if path.is_dir():
        return _inspect_diffusers(path)
    return _inspect_single_file(path, prediction_type)


def source_hash(source: ModelSource, *, full: bool = False) -> str:
    """The model's content hash; ``full`` re-reads every byte instead of trusting the cache
    (for safety checks, see compiler.models.hashing)."""
    if source.format == "single-file":
        return file_sha256(source.path, full=full)
    return folder_sha256(source.path, source.weight_files, full=full)


def detect_pipeline_family(pipeline) -> FamilyDetection:
    """The family of an already-built diffusers pipeline object."""
    components = pipeline.components
    text_configs = {c: components[c].config.to_dict() for c in ("text_encoder", "text_encoder_2")
                    if components.get(c) is not None}
    model_index = {"_class_name": type(pipeline).__name__}
    return detect_family_from_diffusers(model_index, dict(components["unet"].config), text_configs,
                                        source=type(pipeline).__name__)


@contextlib.contextmanager
def quiet_hub_libraries() -> Iterator[None]:
    """No progress bars or info chatter from diffusers/transformers while loading."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
             diffusers_logging.is_progress_bar_enabled(),
             transformers_logging.is_progress_bar_enabled())
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])
        if saved[2]:
            diffusers_logging.enable_progress_bar()
        if saved[3]:
            transformers_logging.enable_progress_bar()


def load_pipeline(source: ModelSource, dtype: torch.dtype, device: str | torch.device):
    from compiler.models.configs import config_folder

    with quiet_hub_libraries():
        import diffusers

        cls = getattr(diffusers, FAMILIES[source.family].pipeline_class)
        try:
            if source.format == "diffusers":
                skipped = {c: None for c in SKIPPED_COMPONENTS
                           if c in source.configs["model_index"]}
                extra = {"requires_safety_checker": False} if "safety_checker" in skipped else {}
                return cls.from_pretrained(source.path, dtype=dtype, local_files_only=True,
                                           variant=source.variant, **skipped, **extra)
            with config_folder(source.family, source.configs) as folder:
                return cls.from_single_file(str(source.path), config=str(folder),
                                            local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
            raise UserError(f"{source.path}: could not be loaded as {source.family} "
                            f"({err.__class__.__name__}: {first[:300]})") from None


def move_pipeline(pipeline, device: str | torch.device):
    with quiet_hub_libraries():
        return pipeline.to(device)


def load_model(path_or_toy: str | os.PathLike = "toy", dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", prediction_type: str | None = None) -> LoadedModel:
    """Load a model offline.

    ``path_or_toy``: "toy" (the embedded toy model), a diffusers folder (sd1, sd2, sdxl, IF
    stage I), or an original single file (.safetensors/.ckpt) of sd1, sd2, sdxl.
    ``dtype``: the dtype of every component in memory. None means float32, whatever the file
    stores (left to themselves, diffusers and transformers would mix: an fp16 folder gives a
    float32 UNet and a float16 text encoder); ``stored_dtype`` reports what the file holds.
    ``prediction_type``: only for SD-2.x single files without ModelSpec metadata, where the file
    cannot tell 512-base ("epsilon") from 768-v ("v_prediction", the default).
    """
    source = path_or_toy if isinstance(path_or_toy, ModelSource) else inspect_source(path_or_toy, prediction_type)
    pipeline = load_pipeline(source, dtype or torch.float32, device)
    pipeline = move_pipeline(pipeline, device)
    registry = registry_from_components(source.family, pipeline.components,
                                        source.detection.matches_reference_widths)
    registry.notes[:0] = source.notes
    return LoadedModel(
        family=source.family,
        pipeline=pipeline,
        source_path=source.path,
        source_format=source.format,
        model_hash=source_hash(source),
        registry=registry,
        dtype=pipeline.unet.dtype,
        stored_dtype=source.stored_dtype,
        prediction_type=source.prediction_type,
        prediction_type_guessed=source.prediction_type_guessed,
        metadata=dict(source.metadata),
        notes=registry.notes,
    )


def load_for_generation(path_or_toy: str | os.PathLike = "toy", device=None,
                        prediction_type: str | None = None) -> LoadedModel:
    """A model that draws images (LocoGen, tracing, verify, generate, the baselines), as the
    device policy says (``compiler.device``): float32 on the CPU; on a GPU the checkpoint's own
    half precision (float16/bfloat16; a float32 checkpoint stays float32). ``policy`` on the
    result records what it runs in."""
    from compiler.device import device_policy

    policy = device_policy(device)
    source = inspect_source(path_or_toy, prediction_type)
    loaded = load_model(source, dtype=policy.generation_dtype(source.stored_dtype), device=policy.device)
    loaded.policy = policy
    return loaded


def build_registry(model_or_folder, family: str | None = None) -> Registry:
    """The registry of a model.

    ``model_or_folder`` is a ``LoadedModel``, a diffusers pipeline object, a path (a diffusers
    folder, a single file, or "toy") or a ``ModelSource`` from ``inspect_source``; a path is
    inspected without loading any weights (its components are built on the meta device from
    their configs).
    """
    if isinstance(model_or_folder, LoadedModel):
        return model_or_folder.registry
    if isinstance(model_or_folder, (str, Path, ModelSource)):
        source = (model_or_folder if isinstance(model_or_folder, ModelSource)
                  else inspect_source(model_or_folder))
        registry = registry_from_components(source.family, meta_components(source),
                                            source.detection.matches_reference_widths)
        registry.notes[:0] = source.notes
        return registry
    pipeline = model_or_folder
    detection = detect_pipeline_family(pipeline)
    if family is not None and family != detection.family:
        raise UserError(f"the pipeline is {detection.family}, not {family}")
    return registry_from_components(detection.family, pipeline.components,
                                    detection.matches_reference_widths)
