"""Read only what a compile edits: the text encoder(s) and tokenizer(s), and the edited tensors.

A compile without verify needs three things from a checkpoint: the tokenizers, the text
encoders (to embed prompts) and the handful of tensors it replaces (the located layers'
``to_k``/``to_v``, or layer 0's attention). :func:`open_model` returns a ``LoadedModel`` that
has exactly those, read lazily:

- ``text_encoder(component)``: built on the meta device from its config and filled from the
  checkpoint's tensors (``safetensors.safe_open``, memory-mapped; a ``.ckpt`` through
  ``torch.load(mmap=True, weights_only=True)``), in float32 for the arithmetic;
- ``read_tensors(names)``: the named tensors as the checkpoint stores them (dtype included);
- ``registry``: from the configs and the text encoders' meta modules; the UNet is never built
  (its cross-attention layers follow from ``unet/config.json``, :func:`cross_attention_names`);
- ``pipeline``: the full diffusers pipeline, built only when something asks for it (verify,
  ONNX export, LocoGen); ``pipeline_loaded`` says whether that happened.

``tensors_read`` counts what was read, so tests can assert that a compile did not read the
UNet (:func:`open_model` never instantiates a UNet or a VAE).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from compiler.errors import UserError
from compiler.models.families import FAMILIES
from compiler.models.layout import (UNetLayout, from_original_value, original_name, text_encoder_name_to_original,
                                    unet_name_to_original)
from compiler.models.load import (LoadedModel, ModelSource, build_meta, load_pipeline, move_pipeline,
                                  quiet_hub_libraries, inspect_source, source_hash)
from compiler.models.registry import CrossAttentionLayer, Registry, text_layer0
from compiler.models.safetensors_file import SafetensorsFile

# --------------------------------------------------------------------------------------------
# The UNet's cross-attention layers from its config
# --------------------------------------------------------------------------------------------


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def cross_attention_names(unet_config: Mapping) -> list[str]:
    """Module names of every ``attn2`` of a diffusers ``UNet2DConditionModel`` with this config,
    as ``named_modules()`` would list them (unsorted).

    Down level i has ``layers_per_block[i]`` attentions of ``transformer_layers_per_block[i]``
    blocks when its type is ``CrossAttn*``; the mid block has one attention of the last level's
    depth (or ``transformer_layers_per_block`` of the mid block when the config names it); up
    level i mirrors down level ``n-1-i`` with one more attention
    (``reverse_transformer_layers_per_block`` when given).
    """
    down_types = list(unet_config["down_block_types"])
    levels = len(down_types)
    per_block = _per_level(unet_config.get("layers_per_block", 2), levels)
    depth = _per_level(unet_config.get("transformer_layers_per_block", 1), levels)
    names = []
    for i, kind in enumerate(down_types):
        if "CrossAttn" in kind:
            for a in range(per_block[i]):
                for b in range(depth[i]):
                    names.append(f"down_blocks.{i}.attentions.{a}.transformer_blocks.{b}.attn2")
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None and "CrossAttn" in mid:
        for b in range(depth[-1]):
            names.append(f"mid_block.attentions.0.transformer_blocks.{b}.attn2")
    up_types = list(unet_config["up_block_types"])
    reverse_depth = unet_config.get("reverse_transformer_layers_per_block")
    reverse_depth = ([_per_level(d, 1)[0] if not isinstance(d, list) else d for d in reverse_depth]
                     if reverse_depth else list(reversed(depth)))
    up_per_block = list(reversed(per_block))
    for i, kind in enumerate(up_types):
        if "CrossAttn" in kind:
            for a in range(up_per_block[i] + 1):
                d = reverse_depth[i]
                for b in range(d if isinstance(d, int) else d[a]):
                    names.append(f"up_blocks.{i}.attentions.{a}.transformer_blocks.{b}.attn2")
    return names


def cross_attention_from_config(family: str, unet_config: Mapping) -> list[CrossAttentionLayer]:
    """The papers' numbering (sorted module names) of an ``attn2`` UNet, without building it."""
    if FAMILIES[family].cross_attention_kind != "attn2":
        raise ValueError(f"{family}: cross-attention layers follow from the config only for attn2 UNets")
    context = unet_config.get("cross_attention_dim", 768)
    context = int(context[0] if isinstance(context, (list, tuple)) else context)
    layout = UNetLayout.from_config(unet_config)
    layers = []
    for index, name in enumerate(sorted(cross_attention_names(unet_config))):
        to_k, to_v = f"{name}.to_k.weight", f"{name}.to_v.weight"
        layers.append(CrossAttentionLayer(index, name, to_k, to_v, unet_name_to_original(to_k, layout),
                                          unet_name_to_original(to_v, layout), context))
    return layers


# --------------------------------------------------------------------------------------------
# Reading tensors lazily, in either layout
# --------------------------------------------------------------------------------------------


class TensorReader:
    """Tensors of a checkpoint by diffusers name (``<component>/<parameter>``), as stored.

    Safetensors files are read range by range (:class:`~compiler.models.safetensors_file.SafetensorsFile`:
    only the requested tensors' bytes); a ``.ckpt`` is loaded once with ``torch.load(mmap=True,
    weights_only=True)``. ``count`` counts the tensors read.
    """

    def __init__(self, source: ModelSource):
        self.source = source
        self.count = 0
        self.names_read: list[str] = []
        self._handles: dict[Path, object] = {}
        self._ckpt: dict[Path, dict[str, torch.Tensor]] = {}
        self._keys: dict[Path, set[str]] = {}

    def _file_keys(self, path: Path) -> set[str]:
        if path not in self._keys:
            if path.suffix == ".safetensors":
                self._keys[path] = set(self._handle(path).keys())
            else:
                self._keys[path] = set(self._state(path))
        return self._keys[path]

    def _handle(self, path: Path) -> SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = SafetensorsFile.read(path)
        return self._handles[path]

    def _state(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._ckpt:
            from compiler.models.checkpoint import load_ckpt_state_dict

            self._ckpt[path], _ = load_ckpt_state_dict(path)  # mmap when it is a zip archive
        return self._ckpt[path]

    def _raw(self, path: Path, key: str) -> torch.Tensor:
        self.count += 1
        if path.suffix == ".safetensors":
            return self._handle(path).get_tensor(key)
        return self._state(path)[key]

    def stored_dtype(self, path: Path, key: str) -> torch.dtype:
        """The dtype file ``path`` stores tensor ``key`` in (a safetensors header says it
        without reading the tensor)."""
        if path.suffix == ".safetensors":
            return self._handle(path).dtype(key)
        return self._state(path)[key].dtype

    def read(self, qualified: str) -> torch.Tensor:
        component, _, parameter = qualified.partition("/")
        self.names_read.append(qualified)
        source = self.source
        if source.format == "diffusers":
            for path in (f for f in source.weight_files if f.parent.name == component):
                keys = self._file_keys(path)
                key = next((k for k in (parameter, "text_model." + parameter,
                                        parameter.removeprefix("text_model.")) if k in keys), None)
                if key is not None:
                    return self._raw(path, key)
            raise UserError(f"{source.path}: holds no tensor {qualified}")
        original = original_name(source.family, qualified, source.configs)
        if original not in self._file_keys(source.path):
            raise UserError(f"{source.path}: holds no tensor {original} ({qualified})")
        return from_original_value(qualified, original, self._raw(source.path, original))


# --------------------------------------------------------------------------------------------
# Text encoders and tokenizers
# --------------------------------------------------------------------------------------------


def _fill_from_reader(module: torch.nn.Module, component: str, reader: TensorReader) -> torch.nn.Module:
    """Materialise a meta-device module with the checkpoint's tensors, as float32."""
    names = list(module.state_dict())
    state = {}
    for name in names:
        try:
            tensor = reader.read(f"{component}/{name}")
        except UserError:
            if name.endswith("position_ids"):
                continue  # a buffer some transformers versions do not save
            raise
        state[name] = tensor.to(torch.float32)
    module.to_empty(device="cpu")
    module.load_state_dict(state, strict=False, assign=True)
    for name, buffer in module.named_buffers():  # non-persistent buffers are not in any file
        if name in state:
            continue
        if not name.endswith("position_ids"):
            raise UserError(f"{reader.source.path}: {component} lacks tensor {name}")
        with torch.no_grad():
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    for name, param in module.named_parameters():
        if name not in state:
            raise UserError(f"{reader.source.path}: {component} lacks tensor {name}")
    return module.eval().requires_grad_(False)


def _tokenizer_folder(source: ModelSource, component: str) -> Path:
    if source.format == "diffusers":
        return source.path / component
    from compiler.models.configs import shipped_config_folder

    return shipped_config_folder(source.family) / component


class SelectiveModel(LoadedModel):
    """A ``LoadedModel`` that reads only what is asked for (see the module docstring)."""

    def __init__(self, source: ModelSource, device: str | torch.device = "cpu"):
        from compiler.device import device_policy

        self.source = source
        self.reader = TensorReader(source)
        self._pipeline = None
        self._export_pipeline = None
        self.policy = device_policy(device)
        self._device = self.policy.device
        self._encoders: dict[str, torch.nn.Module] = {}
        self._tokenizers: dict[str, object] = {}
        registry = selective_registry(source)
        super().__init__(family=source.family, pipeline=None, source_path=source.path,
                         source_format=source.format, model_hash=source_hash(source),
                         registry=registry, dtype=source.stored_dtype or torch.float32,
                         stored_dtype=source.stored_dtype, prediction_type=source.prediction_type,
                         metadata=dict(source.metadata), notes=registry.notes,
                         prediction_type_guessed=source.prediction_type_guessed)

    # LoadedModel's ``pipeline`` field, built on first use: what generates (LocoGen's sweep),
    # on the policy's device in its generation dtype (float32 on the CPU, the stored half
    # precision on a GPU).
    @property
    def pipeline(self):
        if self._pipeline is None:
            if self._export_pipeline is not None and self._device.type == "cpu":
                self._pipeline = self._export_pipeline
            else:
                dtype = self.policy.generation_dtype(self.source.stored_dtype)
                pipeline = load_pipeline(self.source, dtype, self._device)
                self._pipeline = move_pipeline(pipeline, self._device)
        return self._pipeline

    @property
    def export_pipeline(self):
        """The pipeline that exporters trace and fuse into (ONNX): float32 on the CPU, whatever
        the device policy (a graph is device-free; its parity check runs on the CPU)."""
        if self._export_pipeline is None:
            if self._pipeline is not None and self._device.type == "cpu":
                self._export_pipeline = self._pipeline
            else:
                self._export_pipeline = move_pipeline(load_pipeline(self.source, torch.float32, "cpu"), "cpu")
        return self._export_pipeline

    @pipeline.setter
    def pipeline(self, value) -> None:
        self._pipeline = value

    @property
    def pipeline_loaded(self) -> bool:
        return self._pipeline is not None or self._export_pipeline is not None

    @property
    def tensors_read(self) -> int:
        return self.reader.count

    def text_encoder(self, component: str = "text_encoder") -> torch.nn.Module:
        """The encoder that embeds prompts for a solve: float32, on the policy's device (the
        only component a compile moves there). On the CPU a pipeline already built serves."""
        if self._pipeline is not None and self._device.type == "cpu":
            return getattr(self._pipeline, component)
        if component not in self._encoders:
            key = self._encoder_key(component)
            encoder = _RECENT_ENCODERS.pop(key, None)
            if encoder is None:
                if self.source.format == "diffusers":
                    encoder = _load_folder_encoder(self.source, component, self.reader)
                else:
                    meta = build_meta(self.source.configs, component, str(self.source.path))
                    encoder = _fill_from_reader(meta, component, self.reader)
                encoder = encoder.to(self._device)
            self._encoders[component] = encoder
            _RECENT_ENCODERS[key] = encoder  # newest last
            while len(_RECENT_ENCODERS) > _RECENT_ENCODERS_KEPT:
                _RECENT_ENCODERS.pop(next(iter(_RECENT_ENCODERS)))
        return self._encoders[component]

    def _encoder_key(self, component: str) -> tuple[str, str, str]:
        """What decides an encoder's weights: its files' content hash (the whole file's for a
        single file) and the device it sits on."""
        from compiler.preserve_cache import text_encoder_hash

        return text_encoder_hash(self, component), component, str(self._device)

    def tokenizer_for(self, component: str = "text_encoder"):
        if self._pipeline is not None and self._device.type == "cpu":
            return super().tokenizer_for(component)
        name = component.replace("text_encoder", "tokenizer")
        if name not in self._tokenizers:
            from transformers import AutoTokenizer

            with quiet_hub_libraries():
                self._tokenizers[name] = AutoTokenizer.from_pretrained(
                    _tokenizer_folder(self.source, name), local_files_only=True)
        return self._tokenizers[name]

    def read_tensors(self, qualified_names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.reader.read(name) for name in qualified_names}


# A second compile in the same process (the Python API, a notebook, a service) finds the text
# encoder it embedded with last time instead of reading and moving it again (measured on an
# H200: 0.44 s of a 0.70 s re-compile). Keyed by content hash and device; nothing edits these
# modules in place (solves return new tensors; ONNX fuses into ``export_pipeline``).
_RECENT_ENCODERS: dict[tuple[str, str, str], torch.nn.Module] = {}
_RECENT_ENCODERS_KEPT = 2


def _load_folder_encoder(source: ModelSource, component: str, reader: TensorReader) -> torch.nn.Module:
    """A diffusers folder's text encoder: meta-built from its config, filled from its files."""
    meta = build_meta(source.configs, component, str(source.path))
    return _fill_from_reader(meta, component, reader)


def selective_registry(source: ModelSource) -> Registry:
    """The registry from configs: text encoders built on the meta device, the UNet never."""
    family = source.family
    notes = list(source.notes)
    if FAMILIES[family].cross_attention_kind == "attn2":
        layers = cross_attention_from_config(family, source.configs["unet"])
    else:  # IF's added K/V layers: only the meta UNet knows them
        from compiler.models.registry import cross_attention_layers

        unet = build_meta(source.configs, "unet", str(source.path))
        layers = cross_attention_layers(family, unet, source.configs["unet"])
    text = [text_layer0(family, spec.component, build_meta(source.configs, spec.component, str(source.path)))
            for spec in FAMILIES[family].text_encoders if spec.component in source.configs]
    expected = FAMILIES[family].cross_attention_layers
    if expected is not None and len(layers) != expected:
        notes.append(f"{len(layers)} cross-attention layers where {family} has {expected}: the "
                     f"papers' layer indices do not apply")
    return Registry(family, layers, text, source.detection.matches_reference_widths, notes)


def open_model(path_or_toy: str | os.PathLike = "toy", device: str | torch.device = "cpu",
               prediction_type: str | None = None) -> SelectiveModel:
    """A model that reads only what it is asked for (headers and configs up front)."""
    return SelectiveModel(inspect_source(path_or_toy, prediction_type), device)


__all__ = ["SelectiveModel", "TensorReader", "cross_attention_from_config", "cross_attention_names",
           "open_model", "selective_registry", "text_encoder_name_to_original"]
