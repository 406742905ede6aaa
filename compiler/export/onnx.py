"""ONNX export of a diffusion pipeline, checked against PyTorch with onnxruntime.

The output folder has the layout of diffusers' ``OnnxStableDiffusionPipeline`` (and of
optimum's ORT pipelines for SD-XL): one folder per component with ``model.onnx`` (plus
``model.onnx_data`` when the weights exceed protobuf's 2 GB limit) and the component's
``config.json``, the scheduler and tokenizer configs beside them, a ``model_index.json``, and
``editc_onnx.json`` describing every graph's inputs and outputs, dtypes, exporter, the parity
measured at export time and the edit's provenance.

Components and their graphs (all axes named below are dynamic):

- ``text_encoder`` (and ``text_encoder_2`` for SD-XL): ``input_ids`` int32 (batch, sequence)
  -> the outputs optimum's exporter names, in its order: ``last_hidden_state``,
  ``pooler_output`` for a ``CLIPTextModel``; ``text_embeds`` (the 2-D pooled projection, first:
  diffusers' SD-XL pipeline takes output 0 as the pooled embedding when it is 2-D),
  ``last_hidden_state`` for a ``CLIPTextModelWithProjection``; then ``hidden_states.0`` …
  ``hidden_states.N`` (the embeddings and each of the N layers' outputs, before the final layer
  norm: SD-XL conditions on ``hidden_states.{N-1}``). int32 because diffusers'
  ``OnnxStableDiffusionPipeline`` feeds int32 ids and rejects an int64 graph, while optimum's
  ORT pipelines cast the ids to whatever type the graph declares; the graph casts to int64
  inside for the embedding lookup.
- ``unet``: ``sample`` (batch, channels, height, width), ``timestep`` float32 (timestep_batch:
  1 or batch; batch for a dynamo-exported graph), ``encoder_hidden_states`` (batch, sequence, context) [, SD-XL's ``text_embeds``
  (batch, pooled) and ``time_ids`` (batch, 6)] -> ``out_sample``. Height and width must be
  multiples of 2^(levels-1) latent pixels, as for the PyTorch UNet.
- ``vae_encoder``: ``sample`` (batch, 3, height, width) -> ``latent_parameters`` (the posterior's
  mean and log-variance, concatenated on channels: deterministic, unlike a sampled latent).
- ``vae_decoder``: ``latent_sample`` -> ``sample`` in [-1, 1] (unscaled latents: divide by the VAE's
  ``scaling_factor`` first, as every SD pipeline does).

Exporter: torch's TorchScript-based exporter (``dynamo=False``) by default. The dynamo exporter
(``exporter="dynamo"``) also works on these models when spatial axes are declared as multiples
of the UNet's downsampling factor, but it took 119 s for the 9 M-parameter toy UNet on one
core against 4 s, so it is opt-in; a component where it fails falls back to TorchScript, and
``editc_onnx.json`` records which exporter produced each graph.

fp16: every component is exported in float16 except SD-XL's VAE, whose activations overflow
float16 (diffusers' ``force_upcast``); it stays float32. Parity is always measured against the
float32 PyTorch model on the same (fp16-rounded) inputs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch

from compiler.errors import GateFailed, UserError
from compiler.io import atomic_output_dir, check_output_path
from compiler.export.provenance import check_provenance

log = logging.getLogger(__name__)

OPSET = 17
DYNAMO_MIN_OPSET = 18
# protobuf cannot serialize a message over 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3 - 64 * 1024**2
EXTERNAL_DATA_FILE = "model.onnx_data"
# Max abs error allowed, relative to max(1, max |reference|) of each output.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXPORTERS = ("torchscript", "dynamo")
FORMAT = "editc-onnx"
FORMAT_VERSION = 2  # 2: optimum's text-encoder outputs, int32 input_ids, ORT class names


class OnnxParityError(GateFailed):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance (exit code 1)."""


# --------------------------------------------------------------------------------------------
# What each component's graph computes
# --------------------------------------------------------------------------------------------


class TextEncoderGraph(torch.nn.Module):
    """input_ids -> the outputs of ``text_encoder_outputs`` (optimum's names and order)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        output = self.encoder(input_ids=input_ids.to(torch.int64), output_hidden_states=True)
        if hasattr(output, "text_embeds"):
            first = (output.text_embeds, output.last_hidden_state)
        else:
            first = (output.last_hidden_state, output.pooler_output)
        return (*first, *output.hidden_states)


def text_encoder_outputs(encoder: torch.nn.Module) -> list[str]:
    """The output names of a text encoder's graph: optimum's, in optimum's order."""
    with_projection = "WithProjection" in type(encoder).__name__
    first = ["text_embeds", "last_hidden_state"] if with_projection else ["last_hidden_state", "pooler_output"]
    return first + [f"hidden_states.{i}" for i in range(encoder.config.num_hidden_layers + 1)]


def penultimate_output(output_names: list[str]) -> str:
    """The hidden state SD-XL conditions on: the second-to-last layer's output."""
    layers = [name for name in output_names if name.startswith("hidden_states.")]
    return layers[-2]


class UNetGraph(torch.nn.Module):
    """sample, timestep, encoder_hidden_states -> noise (or v) prediction."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UNetXLGraph(torch.nn.Module):
    """SD-XL's UNet: also the pooled text embedding and the size/crop ``time_ids``."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        conditions = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=conditions,
                         return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """image in [-1, 1] -> latent posterior parameters (mean ‖ log-variance)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        hidden = self.vae.encoder(sample)
        return self.vae.quant_conv(hidden) if self.vae.quant_conv is not None else hidden


class VaeDecoderGraph(torch.nn.Module):
    """unscaled latents -> image in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass
class ComponentGraph:
    """One ONNX graph to export: the module, its named inputs and the fixed test inputs."""

    name: str  # the output folder: text_encoder, unet, vae_encoder, ...
    source_component: str  # the pipeline component it comes from
    make_graph: Callable[[torch.nn.Module], torch.nn.Module]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    # Fixed inputs: the first case is traced; every case is checked with onnxruntime.
    cases: list[dict[str, torch.Tensor]]
    # Axes that must stay multiples of this (dynamo's derived dimensions).
    spatial_multiple: int = 1
    float_inputs_keep_fp32: tuple[str, ...] = ("timestep",)
    keep_fp32: bool = False  # export in float32 even for an fp16 export


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    length = min(int(tokenizer.model_max_length), 77)
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(torch.int32)


PARITY_PROMPTS = ("a photograph of an astronaut riding a horse", "a red house in the style of van gogh")


def _text_encoder_graph(name: str, tokenizer, encoder: torch.nn.Module) -> ComponentGraph:
    batch_axes = {0: "batch", 1: "sequence"}
    outputs = text_encoder_outputs(encoder)
    axes = {"input_ids": batch_axes}
    for output in outputs:
        axes[output] = {0: "batch"} if output in ("pooler_output", "text_embeds") else batch_axes
    return ComponentGraph(
        name=name, source_component=name, make_graph=TextEncoderGraph,
        input_names=["input_ids"], output_names=outputs, dynamic_axes=axes,
        cases=[{"input_ids": _token_ids(tokenizer, list(PARITY_PROMPTS))},
               {"input_ids": _token_ids(tokenizer, [""])}],
    )


def _unet_graph(pipeline) -> ComponentGraph:
    config = pipeline.unet.config
    multiple = 2 ** (len(config.down_block_types) - 1)
    spatial = {0: "batch", 2: "height", 3: "width"}
    names = ["sample", "timestep", "encoder_hidden_states"]
    axes = {"sample": spatial, "timestep": {0: "timestep_batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"}, "out_sample": spatial}
    sdxl = config.addition_embed_type == "text_time"
    if sdxl:
        names += ["text_embeds", "time_ids"]
        axes.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})
        pooled_width = pipeline.text_encoder_2.config.projection_dim
        time_ids_width = (config.projection_class_embeddings_input_dim - pooled_width) // config.addition_time_embed_dim
    vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1) if pipeline.vae is not None else 8

    def case(seed: int, batch: int, height: int, width: int, timestep: float, timestep_batch: int):
        g = _generator(seed)
        inputs = {
            "sample": torch.randn(batch, config.in_channels, height, width, generator=g),
            "timestep": torch.full((timestep_batch,), timestep, dtype=torch.float32),
            "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=g),
        }
        if sdxl:
            inputs["text_embeds"] = torch.randn(batch, pooled_width, generator=g)
            pixels = [height * vae_scale, width * vae_scale]
            time_ids = (pixels + [0, 0] + pixels)[:time_ids_width]
            inputs["time_ids"] = torch.tensor([time_ids] * batch, dtype=torch.float32)
        return inputs

    return ComponentGraph(
        name="unet", source_component="unet", make_graph=UNetXLGraph if sdxl else UNetGraph,
        input_names=names, output_names=["out_sample"], dynamic_axes=axes,
        # Traced at 3×2 blocks: no spatial size of 1 block, which torch.export would specialize.
        cases=[case(0, 2, 3 * multiple, 2 * multiple, 981.0, 2),
               case(1, 1, multiple, 3 * multiple, 1.0, 1)],
        spatial_multiple=multiple,
    )


def _vae_graphs(pipeline, family: str) -> list[ComponentGraph]:
    config = pipeline.vae.config
    scale = 2 ** (len(config.block_out_channels) - 1)
    spatial = {0: "batch", 2: "height", 3: "width"}
    from compiler.models.families import FAMILIES

    keep_fp32 = FAMILIES[family].onnx_vae_float32  # SD-XL's VAE overflows in float16
    encoder_cases, decoder_cases = [], []
    for seed, (batch, height, width) in enumerate([(2, 2, 1), (1, 1, 3)]):
        g = _generator(100 + seed)
        encoder_cases.append({"sample": torch.rand(batch, config.in_channels, height * scale * 2,
                                                   width * scale * 2, generator=g) * 2 - 1})
        decoder_cases.append({"latent_sample": torch.randn(batch, config.latent_channels,
                                                           height * 2, width * 2, generator=g)})
    return [
        ComponentGraph("vae_encoder", "vae", VaeEncoderGraph, ["sample"], ["latent_parameters"],
                       {"sample": spatial, "latent_parameters": spatial}, encoder_cases,
                       spatial_multiple=scale, keep_fp32=keep_fp32),
        ComponentGraph("vae_decoder", "vae", VaeDecoderGraph, ["latent_sample"], ["sample"],
                       {"latent_sample": spatial, "sample": spatial}, decoder_cases,
                       keep_fp32=keep_fp32),
    ]


def component_graphs(pipeline, family: str) -> list[ComponentGraph]:
    """The graphs of a pipeline, in export order, with their fixed parity inputs."""
    from compiler.models.families import FAMILIES

    graphs = [_text_encoder_graph(spec.component, getattr(pipeline, spec.component.replace("text_encoder", "tokenizer")),
                                  getattr(pipeline, spec.component))
              for spec in FAMILIES[family].text_encoders]
    graphs.append(_unet_graph(pipeline))
    graphs.extend(_vae_graphs(pipeline, family))
    return graphs


# --------------------------------------------------------------------------------------------
# Loading the model
# --------------------------------------------------------------------------------------------


@dataclass
class _Model:
    pipeline: object
    family: str
    source: str
    base_hash: str | None = None


def _resolve_model(pipeline_or_folder) -> _Model:
    """A LoadedModel, a diffusers pipeline object, or a path (or 'toy') to load offline."""
    from compiler.models.load import LoadedModel, detect_pipeline_family, load_model

    if isinstance(pipeline_or_folder, (str, os.PathLike)):
        pipeline_or_folder = load_model(pipeline_or_folder, dtype=torch.float32)
    if isinstance(pipeline_or_folder, LoadedModel):
        model = pipeline_or_folder
        return _Model(model.pipeline, model.family, str(model.source_path), model.model_hash)
    family = detect_pipeline_family(pipeline_or_folder).family
    return _Model(pipeline_or_folder, family, type(pipeline_or_folder).__name__)


def _input_paths(pipeline_or_folder) -> list:
    """The model's files on disk, which an output must not overwrite."""
    from compiler.models.load import LoadedModel, resolve_model_path

    if isinstance(pipeline_or_folder, LoadedModel):
        return [pipeline_or_folder.source_path]
    if isinstance(pipeline_or_folder, (str, os.PathLike)):
        return [resolve_model_path(pipeline_or_folder)]
    return []


def _check_family(family: str) -> None:
    from compiler.models.families import FAMILIES

    if FAMILIES[family].onnx_pipeline_class is None:
        supported = ", ".join(f.name for f in FAMILIES.values() if f.onnx_pipeline_class)
        raise UserError(f"ONNX export supports {supported} models; this model is {family} "
                        f"(DeepFloyd IF's cascaded pixel-space pipeline has no ONNX layout here)")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _cast_inputs(inputs: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 keep_fp32: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {name: value.to(dtype) if value.is_floating_point() and name not in keep_fp32 else value
            for name, value in inputs.items()}


def _export_torchscript(graph_module, graph: ComponentGraph, inputs, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow
        torch.onnx.export(graph_module, tuple(inputs[n] for n in graph.input_names), str(path),
                          dynamo=False, opset_version=opset, input_names=graph.input_names,
                          output_names=graph.output_names, dynamic_axes=graph.dynamic_axes,
                          do_constant_folding=True)


def _export_dynamo(graph_module, graph: ComponentGraph, inputs, path: Path, opset: int) -> None:
    from torch.export import Dim

    dims: dict[str, object] = {}

    def dim(axis_name: str):
        # torch.export proves that the UNet expands the timesteps to the batch, so it will not
        # keep a separate timestep batch: a dynamo graph takes one timestep per sample.
        axis_name = "batch" if axis_name == "timestep_batch" else axis_name
        if axis_name not in dims:
            if axis_name in ("height", "width") and graph.spatial_multiple > 1:
                dims[axis_name] = graph.spatial_multiple * Dim(f"{axis_name}_blocks", min=1, max=1024)
            else:
                dims[axis_name] = Dim(axis_name, min=1, max=4096)
        return dims[axis_name]

    dynamic_shapes = {name: {axis: dim(axis_name) for axis, axis_name in graph.dynamic_axes[name].items()}
                      for name in graph.input_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph_module, tuple(inputs[n] for n in graph.input_names), str(path),
                          dynamo=True, opset_version=max(opset, DYNAMO_MIN_OPSET),
                          input_names=graph.input_names, output_names=graph.output_names,
                          dynamic_shapes=dynamic_shapes, external_data=True, verbose=False)


def _initializer_bytes(model) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def _finalize_onnx(scratch_file: Path, final_file: Path, metadata: Mapping[str, str],
                   external_data_threshold_bytes: int) -> str | None:
    """Re-save an exported graph in its final place: one external data file when the weights
    are over the threshold, and editc's metadata in ``metadata_props``. Returns the external
    data file's name, or None."""
    import onnx

    model = onnx.load(str(scratch_file), load_external_data=True)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=value)
    external = _initializer_bytes(model) > external_data_threshold_bytes
    if external:
        onnx.save_model(model, str(final_file), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(final_file))
    onnx.checker.check_model(str(final_file))
    if external:
        # onnx writes its external data file 0600; readers of the folder need it like model.onnx
        os.chmod(final_file.parent / EXTERNAL_DATA_FILE, stat.S_IMODE(final_file.stat().st_mode))
    return EXTERNAL_DATA_FILE if external else None


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` in ``dtype`` (the caller's model is left as it is), without
    diffusers' warning about casting with ``.to()``: every module is meant to be cast here."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return copy.deepcopy(module).to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _eager_attention(module: torch.nn.Module) -> Iterator[None]:
    """Run a transformers model with its eager attention while it is traced.

    The TorchScript exporter's symbolic for ``scaled_dot_product_attention`` with a float mask
    computes in float32 and leaves the rest of an fp16 CLIP graph in float32 (onnxruntime then
    rejects the mixed-type LayerNormalization); the eager path casts explicitly.
    """
    config = getattr(module, "config", None)
    saved = getattr(config, "_attn_implementation", None)
    if saved is None or not hasattr(module, "set_attn_implementation"):
        yield
        return
    module.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.set_attn_implementation(saved)


def _export_graph(pipeline, graph: ComponentGraph, dtype_name: str, out_folder: Path, *,
                  exporter: str, opset: int, external_data_threshold_bytes: int,
                  metadata: Mapping[str, str]) -> dict:
    component = getattr(pipeline, graph.source_component)
    dtype = torch.float32 if graph.keep_fp32 else DTYPES[dtype_name]
    module = component if component.dtype == dtype else _cast_copy(component, dtype)
    graph_module = graph.make_graph(module).eval()
    inputs = _cast_inputs(graph.cases[0], dtype, graph.float_inputs_keep_fp32)
    out_folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=out_folder))
    started = time.perf_counter()
    used = exporter
    try:
        with torch.no_grad(), _eager_attention(module):
            if exporter == "dynamo":
                try:
                    _export_dynamo(graph_module, graph, inputs, scratch / "model.onnx", opset)
                except Exception as err:  # the dynamo exporter fails on some graphs: fall back
                    log.warning("dynamo export of %s failed (%s: %s); using the TorchScript exporter",
                                graph.name, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                    shutil.rmtree(scratch)
                    scratch.mkdir()
                    used = "torchscript"
            if used == "torchscript":
                _export_torchscript(graph_module, graph, inputs, scratch / "model.onnx", opset)
        external = _finalize_onnx(scratch / "model.onnx", out_folder / "model.onnx",
                                  {**metadata, "editc.onnx.component": graph.name,
                                   "editc.onnx.dtype": "fp32" if dtype == torch.float32 else "fp16"},
                                  external_data_threshold_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - started
    config = getattr(component, "config", None)
    if config is not None:
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        (out_folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True,
                                                           default=str) + "\n")
    return {
        "file": f"{graph.name}/model.onnx",
        "external_data": f"{graph.name}/{external}" if external else None,
        "dtype": "fp32" if dtype == torch.float32 else "fp16",
        "exporter": used,
        "inputs": graph.input_names,
        "outputs": graph.output_names,
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in graph.dynamic_axes.items()},
        "spatial_multiple": graph.spatial_multiple,
        "_seconds": seconds,
    }


# ``_class_name`` decides which auto-loader finds the folder; explicit classes ignore it.
# optimum's ``ORTDiffusionPipeline``/``ORTPipelineForText2Image`` map only optimum's class names
# (or the PyTorch pipeline's), and diffusers' ``DiffusionPipeline.from_pretrained`` maps only
# diffusers' names: no one name serves both auto-loaders. The ORT name wins, since diffusers'
# ONNX pipeline class (SD-1/2 only, deprecated upstream) is always named explicitly in its
# documentation: ``OnnxStableDiffusionPipeline.from_pretrained(folder)`` loads this folder
# whatever ``_class_name`` says, while ``DiffusionPipeline.from_pretrained(folder)`` does not.
# (``Family.onnx_pipeline_class``.)


def _model_index(pipeline, family: str) -> dict:
    import diffusers

    from compiler.models.families import FAMILIES

    rules = FAMILIES[family]

    def library_of(component) -> list[str]:
        module = type(component).__module__.split(".")[0]
        return [module, type(component).__name__]

    index = {
        "_class_name": rules.onnx_pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "scheduler": library_of(pipeline.scheduler),
        "text_encoder": ["diffusers", "OnnxRuntimeModel"],
        "tokenizer": library_of(pipeline.tokenizer),
        "unet": ["diffusers", "OnnxRuntimeModel"],
        "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
        "vae_encoder": ["diffusers", "OnnxRuntimeModel"],
    }
    for spec in rules.text_encoders[1:]:
        index[spec.component] = ["diffusers", "OnnxRuntimeModel"]
        tokenizer = spec.component.replace("text_encoder", "tokenizer")
        index[tokenizer] = library_of(getattr(pipeline, tokenizer))
    if rules.joins_text_encoders:
        index["force_zeros_for_empty_prompt"] = bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", True))
    else:
        index.update({"feature_extractor": [None, None], "safety_checker": [None, None],
                      "requires_safety_checker": False})
    return dict(sorted(index.items()))


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``save_pretrained`` plus ``vocab.json`` and ``merges.txt``.

    transformers 5 saves only ``tokenizer.json``; transformers 4's ``CLIPTokenizer`` (which
    optimum's ORT pipelines load, as named in ``model_index.json``) needs the BPE files. The
    fast tokenizer's BPE model writes them: for CLIP they equal OpenAI's files, ids included.
    """
    tokenizer.save_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is not None and type(model).__name__ == "BPE":
        model.save(str(folder))
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise UserError(f"{folder}: tokenizer {type(tokenizer).__name__} wrote no vocab.json and "
                        f"merges.txt; the ONNX clients need a CLIP BPE tokenizer")


def _save_configs(pipeline, family: str, folder: Path) -> None:
    pipeline.scheduler.save_pretrained(str(folder / "scheduler"))
    from compiler.models.families import FAMILIES

    for spec in FAMILIES[family].text_encoders:
        tokenizer = spec.component.replace("text_encoder", "tokenizer")
        save_tokenizer(getattr(pipeline, tokenizer), folder / tokenizer)
    (folder / "model_index.json").write_text(json.dumps(_model_index(pipeline, family), indent=2) + "\n")


@contextlib.contextmanager
def weights_as_stored(pipeline, new_tensors: Mapping[str, torch.Tensor],
                      stored_dtype: torch.dtype | None) -> Iterator[None]:
    """Hold the edited tensors in ``pipeline`` as a checkpoint of ``stored_dtype`` stores them
    while an ONNX export reads the pipeline, so that the ONNX graphs carry exactly the weights
    that compile's other outputs (diffusers folder, single file, delta) write, not the
    in-memory float32 solve. The pipeline's own values come back afterwards."""
    from compiler.fuse import get_parameter

    if stored_dtype is None or not new_tensors:
        yield
        return
    saved = {}
    with torch.no_grad():
        for name, value in new_tensors.items():
            parameter = get_parameter(pipeline, name)
            if stored_dtype == parameter.dtype:
                continue
            saved[name] = parameter.detach().clone()
            parameter.copy_(value.to(stored_dtype).to(parameter.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                get_parameter(pipeline, name).copy_(value)


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote and measured."""

    path: Path
    family: str
    dtype: str
    components: dict[str, dict]
    parity: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # export time per component

    def max_abs_errors(self) -> dict[str, float]:
        return {name: result["max_abs_error"] for name, result in self.parity.items()}


def export_onnx(pipeline_or_folder, out_dir: str | os.PathLike, dtype: str = "fp32", *,
                force: bool = False, provenance: Mapping[str, str] | None = None,
                exporter: str = "torchscript", check: bool = True, opset: int = OPSET,
                external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
                tolerance: float | None = None,
                providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> OnnxExport:
    """Export a pipeline's text encoder(s), UNet, VAE encoder and decoder to ONNX.

    Graphs are traced from the float32 pipeline on the CPU (a graph is device-free);
    ``providers`` are the onnxruntime execution providers the parity check runs on.

    ``pipeline_or_folder``: a ``LoadedModel``, a diffusers pipeline object, or a model path
    ('toy', a diffusers folder, a single file). ``dtype``: 'fp32' or 'fp16'. With ``check``
    (the default) every graph is run with onnxruntime on fixed inputs and compared with the
    float32 PyTorch model before the folder appears at ``out_dir``; an error over ``tolerance``
    raises ``OnnxParityError`` and nothing is written. The folder is written atomically and
    replaces an existing ``out_dir`` only with ``force``.
    """
    if dtype not in DTYPES:
        raise UserError(f"ONNX dtype '{dtype}' is not supported; valid: {', '.join(DTYPES)}")
    if exporter not in EXPORTERS:
        raise UserError(f"ONNX exporter '{exporter}' is not supported; valid: {', '.join(EXPORTERS)}")
    if opset < OPSET:
        raise UserError(f"ONNX opset {opset} is too old; valid: {OPSET} or newer")
    metadata = check_provenance(provenance or {})
    check_output_path(out_dir, force=force, inputs=_input_paths(pipeline_or_folder))  # before loading
    model = _resolve_model(pipeline_or_folder)
    _check_family(model.family)
    pipeline = model.pipeline
    graphs = component_graphs(pipeline, model.family)
    with atomic_output_dir(out_dir, force=force, inputs=_input_paths(pipeline_or_folder)) as folder:
        components, seconds = {}, {}
        for graph in graphs:
            info = _export_graph(pipeline, graph, dtype, folder / graph.name, exporter=exporter,
                                 opset=opset, external_data_threshold_bytes=external_data_threshold_bytes,
                                 metadata=metadata)
            seconds[graph.name] = info.pop("_seconds")
            components[graph.name] = info
        _save_configs(pipeline, model.family, folder)
        vae_config = pipeline.vae.config
        description = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": model.family,
            "dtype": dtype,
            "opset": opset,
            "base_model_sha256": model.base_hash,
            "vae_scaling_factor": float(vae_config.scaling_factor),
            "vae_shift_factor": float(getattr(vae_config, "shift_factor", None) or 0.0),
            "vae_scale_factor": 2 ** (len(vae_config.block_out_channels) - 1),
            "latent_channels": int(pipeline.unet.config.in_channels),
            "default_latent_size": int(pipeline.unet.config.sample_size),
            # SD-XL: unconditional embeddings are zeros rather than the encoded empty prompt.
            "force_zeros_for_empty_prompt": bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", False)),
            "components": components,
            "provenance": metadata,
        }
        parity = {}
        if check:
            try:
                parity = check_onnx_parity(folder, pipeline, family=model.family, tolerance=tolerance,
                                           providers=providers)
            except OnnxParityError as err:
                details = str(err).split(": ", 1)[-1]
                raise OnnxParityError(f"{Path(out_dir)}: not written, {details}") from None
            description["parity"] = parity
        (folder / "editc_onnx.json").write_text(json.dumps(description, indent=2) + "\n")
    return OnnxExport(Path(out_dir), model.family, dtype, components, parity, seconds)


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


def ort_session(model_file: str | os.PathLike, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    """An onnxruntime session; its thread count follows ``OMP_NUM_THREADS`` when set."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_file), sess_options=options, providers=list(providers))


def _session_input_dtypes(session) -> dict[str, np.dtype]:
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(double)": np.float64}
    return {i.name: types[i.type] for i in session.get_inputs()}


def check_onnx_parity(onnx_dir: str | os.PathLike, reference, *, family: str | None = None,
                      tolerance: float | None = None,
                      providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> dict[str, dict]:
    """Run every exported graph with onnxruntime on fixed inputs and compare with PyTorch.

    ``reference``: the float32 PyTorch model (pipeline object, ``LoadedModel`` or path).
    Returns, per component, ``max_abs_error`` (over all outputs and test cases), the scale
    (max |reference output|) and the tolerance applied (``tolerance`` × max(1, scale); by
    default 1e-3 for fp32 graphs, 3e-2 for fp16). Raises ``OnnxParityError`` naming every
    component over its tolerance.
    """
    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "editc_onnx.json").is_file() and not (onnx_dir / "unet" / "model.onnx").is_file():
        raise UserError(f"{onnx_dir}: not an ONNX export folder (no unet/model.onnx)")
    model = _resolve_model(reference) if family is None else _Model(reference, family, "")
    pipeline = model.pipeline
    results: dict[str, dict] = {}
    failures = []
    for graph in component_graphs(pipeline, model.family):
        session = ort_session(onnx_dir / graph.name / "model.onnx", providers)
        input_dtypes = _session_input_dtypes(session)
        dtype_name = "fp16" if session.get_outputs()[0].type == "tensor(float16)" else "fp32"
        module = getattr(pipeline, graph.source_component)
        reference_module = module if module.dtype == torch.float32 else _cast_copy(module, torch.float32)
        graph_module = graph.make_graph(reference_module).eval()
        worst, scale = 0.0, 0.0
        per_output: dict[str, float] = {}
        for case in graph.cases:
            # Feed both sides the same values: rounded to the graph's dtype first.
            feed = {name: value.numpy().astype(input_dtypes[name]) for name, value in case.items()}
            torch_inputs = [torch.from_numpy(feed[n]).to(case[n].dtype) for n in graph.input_names]
            with torch.no_grad():
                expected = graph_module(*torch_inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            actual = session.run(graph.output_names, feed)
            for name, want, got in zip(graph.output_names, expected, actual):
                want = want.float().numpy()
                error = float(np.max(np.abs(got.astype(np.float32) - want))) if want.size else 0.0
                if not np.all(np.isfinite(got)):
                    error = float("inf")
                per_output[name] = max(per_output.get(name, 0.0), error)
                worst = max(worst, error)
                scale = max(scale, float(np.max(np.abs(want))) if want.size else 0.0)
        allowed = (tolerance if tolerance is not None else TOLERANCE[dtype_name]) * max(1.0, scale)
        results[graph.name] = {"max_abs_error": worst, "per_output": per_output, "scale": scale,
                               "tolerance": allowed, "dtype": dtype_name, "cases": len(graph.cases),
                               "passed": worst <= allowed}
        if not worst <= allowed:
            failures.append(f"{graph.name} max abs error {worst:.3g} > {allowed:.3g}")
    if failures:
        raise OnnxParityError(f"{onnx_dir}: onnxruntime differs from PyTorch: " + "; ".join(failures))
    return results


def write_output(job) -> dict:
    """Compile's ``onnx`` format (:mod:`compiler.export.formats`): graphs from the weights as the
    checkpoint stores them, checked against PyTorch."""
    loaded = job.loaded
    pipeline = job.edited_pipeline()  # float32 on the CPU, whatever the device policy
    with weights_as_stored(pipeline, job.new_tensors, loaded.stored_dtype):
        exported = export_onnx(pipeline, job.folder / "onnx", provenance=job.provenance)
    return {"onnx": str(job.out / "onnx"), "onnx_max_abs_error": exported.max_abs_errors()}


# --------------------------------------------------------------------------------------------
# ``editc export onnx`` (named by this format's registry entry)
# --------------------------------------------------------------------------------------------

from compiler.cli.options import device_option  # noqa: E402 (the CLI's option, for the command only)


def _echo_json(document: dict) -> None:
    import json

    click.echo(json.dumps(document, indent=2, default=str))


@click.command("onnx")
@click.argument("model", default="toy")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (text_encoder/, unet/, vae_decoder/, vae_encoder/ ...).")
@click.option("--fp16", is_flag=True, help="Export float16 graphs (default float32).")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript",
              show_default=True, help="torch.onnx exporter; dynamo falls back to torchscript per "
              "component where it fails.")
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime parity check.")
@click.option("--tolerance", type=float, default=None,
              help="Max abs error allowed relative to max(1, max|output|) (default 1e-3 fp32, 3e-2 fp16).")
@device_option
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(model, out_dir, fp16, exporter, no_check, tolerance, device, force, as_json):
    """Export MODEL's text encoder(s), UNet and VAE to ONNX, checked with onnxruntime.

    Graphs are traced in float32 on the CPU; --device picks where onnxruntime runs the parity
    check (cuda: its CUDA execution provider, from onnxruntime-gpu). Exits 1 when an
    onnxruntime output differs from PyTorch by more than the tolerance (nothing is written then).
    """
    from compiler.device import resolve_device
    from compiler.export.onnx_pipeline import providers_for
    from compiler.export.provenance import read_provenance
    from compiler.io import claim_output, input_paths
    from compiler.models.load import load_model

    providers = providers_for(resolve_device(device))
    if resolve_device(device).type == "cuda":
        if "CUDAExecutionProvider" not in providers:
            raise UserError("--device cuda: this onnxruntime has no CUDA execution provider; "
                            "pip install 'editc[gpu]' (onnxruntime-gpu), or use --device cpu")
    started = time.perf_counter()
    # Claimed (checked, locked) before the minutes a large model takes to load.
    with claim_output(out_dir, force=force, inputs=input_paths(model), kind="dir"):
        loaded = load_model(model)
        provenance = read_provenance(loaded.source_path)
        result = export_onnx(loaded, out_dir, "fp16" if fp16 else "fp32", force=force, provenance=provenance,
                             exporter=exporter, check=not no_check, tolerance=tolerance, providers=providers)
    seconds = time.perf_counter() - started
    if as_json:
        _echo_json({"out": str(result.path), "family": result.family, "dtype": result.dtype,
                    "components": result.components, "parity": result.parity,
                    "export_seconds": result.seconds, "total_seconds": seconds})
        return
    click.echo(f"wrote ONNX ({result.dtype}, {result.family}) to {result.path} in {seconds:.1f} s")
    for name, info in result.components.items():
        line = f"  {name:<15} {info['dtype']}  {info['exporter']:<11} {result.seconds[name]:6.1f} s"
        if name in result.parity:
            check = result.parity[name]
            line += f"  max abs error {check['max_abs_error']:.2e} (tolerance {check['tolerance']:.1e})"
        click.echo(line)
