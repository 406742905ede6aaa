"""The one prompt encoder: text-encoder states at the token positions an edit needs.

Every stage that embeds prompts for an edit (compile's LocoEdit and Diff-QuickFix rows, the
closed-form baselines, locate's conditioning) asks here, with the prompts and, per prompt, the
positions it needs. Three rules make that cheap (README, "Real size": "One prompt
encoder"):

- **Identical prompts are encoded once** (their requests are merged).
- **CLIP is causal**: the state at position p depends only on tokens 0…p, so a prompt is run
  only up to the last position any request needs (its subject token or EOS; all 77 tokens only
  when padding rows are asked for). The token ids are those the pipeline feeds (padded to the
  tokenizer's 77 with its own pad token), cut to that prefix.
- **Batches hold prompts of one prefix length**: no padding and no attention mask, so each row is
  what the pipeline's 77-token pass computes there (to float rounding).
- **Layer-0 states stop at layer 0**: Diff-QuickFix's keys are read by a hook that ends the
  forward pass right there.

The contexts are the UNet's: the last hidden state for SD-1/2 (after the final layer norm, as
``StableDiffusionPipeline.encode_prompt``), the penultimate hidden states of both encoders
concatenated for SD-XL (as ``StableDiffusionXLPipeline.encode_prompt``). DeepFloyd IF's T5 is
bidirectional: its prompts go through the pipeline's own ``encode_prompt`` whole.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

MAX_BATCH = 256
TOKEN_BUDGET = 8192  # prompts × tokens per forward pass (bounds activation memory)


class _Stop(Exception):
    """Raised by a capture hook: the states needed are in hand, the rest of the pass is waste."""


class PromptEncoder:
    """Encodes prompts with a model's text encoder(s); ``model`` is a ``LoadedModel`` (its
    ``text_encoder``/``tokenizer_for`` give modules without building the UNet)."""

    def __init__(self, model):
        if not hasattr(model, "registry"):  # a bare diffusers pipeline
            model = PipelineModel(model)
        self.model = model
        self.family = model.family
        self.components = [spec.component for spec in model.registry.text_layer0]
        self._ids: dict[tuple[str, str], list[int]] = {}

    # ------------------------------------------------------------------ tokens
    def tokenizer(self, component: str = "text_encoder"):
        return self.model.tokenizer_for(component)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer().model_max_length)

    def token_ids(self, prompts: Sequence[str], component: str = "text_encoder") -> list[list[int]]:
        """The ids the pipeline feeds: truncated and padded to the tokenizer's length."""
        todo = list(dict.fromkeys(p for p in prompts if (component, p) not in self._ids))
        if todo:
            tok = self.tokenizer(component)
            ids = tok(todo, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            for prompt, row in zip(todo, ids):
                self._ids[(component, prompt)] = list(row)
        return [self._ids[(component, p)] for p in prompts]

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def context_rows(self, prompts: Sequence[str], positions: Sequence[Sequence[int]]) -> torch.Tensor:
        """UNet context rows ``context[n, p]`` for each prompt n and each of its positions p, in
        that order: (Σ positions, d) float32, on the text encoder's device (as every method
        here returns them: the caller moves them where they are needed)."""
        from compiler.models.families import FAMILIES

        if not FAMILIES[self.family].causal_text_encoder:  # T5: every token sees the whole prompt
            return _gather(self._pipeline_contexts(prompts), positions)
        return self._rows(prompts, positions, self._context_batch)

    @torch.no_grad()
    def contexts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Whole 77-token contexts, (N, 77, d) float32, as the pipeline conditions the UNet."""
        every = list(range(self.max_length))
        rows = self.context_rows(prompts, [every] * len(prompts))
        return rows.reshape(len(prompts), self.max_length, -1)

    @torch.no_grad()
    def module_inputs(self, prompts: Sequence[str], positions: Sequence[Sequence[int]],
                      module: torch.nn.Module, component: str = "text_encoder") -> torch.Tensor:
        """What ``module`` (inside the encoder ``component``) receives at those positions
        (e.g. Diff-QuickFix's keys, the inputs of layer 0's ``out_proj``); float32."""
        encoder = self.model.text_encoder(component)

        def run(chunk: list[str], length: int) -> torch.Tensor:
            return _capture_input(encoder, module, self._ids_tensor(chunk, length, component))

        return self._rows(prompts, positions, run, component)

    @torch.no_grad()
    def value_keys(self, prompts: Sequence[str], positions: Sequence[Sequence[int]],
                   attention: torch.nn.Module, component: str = "text_encoder") -> torch.Tensor:
        """Keys of a ``v_proj`` edit, ``k_hi = Σ_j a_hij x_j`` per head h at each position i
        (``x_j`` the attention's inputs, ``a_hij`` its causal softmax weights, recomputed from
        ``q_proj``/``k_proj`` so any attention kernel gives the same keys): (H, R, d) float64.

        Head h's output at i is ``W_h k_hi + b_h`` (the weights sum to 1), so a closed-form
        edit of ``W_h`` on these keys sets what the head emits there exactly.
        """
        encoder = self.model.text_encoder(component)
        heads = int(attention.num_heads)

        def run(chunk: list[str], length: int) -> torch.Tensor:
            x = _capture_input(encoder, attention.v_proj, self._ids_tensor(chunk, length, component))  # B × L × d
            batch, length = x.shape[:2]
            q = attention.q_proj(x).double().view(batch, length, heads, -1).transpose(1, 2)
            k = attention.k_proj(x).double().view(batch, length, heads, -1).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            weights = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)  # B × H × L × L
            return (weights @ x.double().unsqueeze(1)).transpose(1, 2)  # B × L × H × d

        rows = self._rows(prompts, positions, run, component, dtype=torch.float64)  # R × H × d
        return rows.transpose(0, 1).contiguous()

    # ------------------------------------------------------------------ machinery
    def _rows(self, prompts, positions, run, component: str = "text_encoder", dtype=torch.float32) -> torch.Tensor:
        """Run ``run(prompts, length)`` (-> B × length × …) over the unique prompts, each to the prefix
        its requests need, in batches of one length; gather the requested rows in order."""
        if len(prompts) != len(positions):
            raise ValueError(f"{len(prompts)} prompts but {len(positions)} position lists")
        need: dict[str, int] = {}
        for prompt, pos in zip(prompts, positions):
            if len(pos):
                if min(pos) < 0:
                    raise ValueError(f"negative position {min(pos)} for {prompt!r}")
                need[prompt] = max(need.get(prompt, 0), max(pos) + 1)
        full = self.max_length
        for prompt, n in need.items():
            if n > full:
                raise ValueError(f"position {n - 1} is beyond the {full} tokens of {prompt!r}")
        by_length: dict[int, list[str]] = defaultdict(list)
        for prompt, n in need.items():
            by_length[n].append(prompt)
        # Each batch's states flattened to (B·length, …); a prompt is (batch, its first row).
        batches: list[torch.Tensor] = []
        where: dict[str, tuple[int, int]] = {}
        for length in sorted(by_length):
            group = by_length[length]
            step = max(1, min(MAX_BATCH, TOKEN_BUDGET // length))
            for i in range(0, len(group), step):
                chunk = group[i : i + step]
                out = run(chunk, length).to(dtype)  # stays on the encoder's device
                for j, prompt in enumerate(chunk):
                    where[prompt] = (len(batches), j * length)
                batches.append(out.reshape(out.shape[0] * length, *out.shape[2:]))
        return _gather_rows(batches, where, prompts, positions, dtype, self.device)

    @property
    def device(self) -> torch.device:
        """Where the (first) text encoder computes, and where its rows are returned."""
        return next(self.model.text_encoder(self.components[0]).parameters()).device

    def _ids_tensor(self, prompts: list[str], length: int, component: str) -> torch.Tensor:
        ids = torch.tensor([row[:length] for row in self.token_ids(prompts, component)], dtype=torch.long)
        return ids.to(next(self.model.text_encoder(component).parameters()).device)

    def _context_batch(self, prompts: list[str], length: int) -> torch.Tensor:
        if len(self.components) == 1:
            component = self.components[0]
            return self.model.text_encoder(component)(self._ids_tensor(prompts, length, component))[0].float()
        # SD-XL: the penultimate hidden state of each encoder, concatenated; each encoder reads
        # its own tokenizer's ids (the same BPE; only the pad token differs).
        # The penultimate hidden state is the last layer's input: captured there, the last layer
        # never runs and no other layer's states are kept (all 33 of bigG's would be GBs).
        parts = []
        for component in self.components:
            encoder = self.model.text_encoder(component)
            last = encoder_layers(encoder)[-1]
            parts.append(_capture_input(encoder, last, self._ids_tensor(prompts, length, component)).float())
        return torch.cat(parts, dim=-1)

    def _pipeline_contexts(self, prompts) -> torch.Tensor:
        pipe = self.model.pipeline
        unique = list(dict.fromkeys(prompts))
        parts = []
        for i in range(0, len(unique), MAX_BATCH):
            parts.append(pipe.encode_prompt(unique[i : i + MAX_BATCH], pipe.device, 1, False)[0].float())
        states = dict(zip(unique, torch.cat(parts)))
        return torch.stack([states[p] for p in prompts])


def encoder_layers(encoder: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer layers of a CLIP text model (``encoder.layers``, with or without
    transformers' ``text_model.`` level)."""
    for name in ("encoder.layers", "text_model.encoder.layers"):
        try:
            return encoder.get_submodule(name)
        except AttributeError:
            continue
    raise ValueError(f"{type(encoder).__name__} has no encoder.layers")


def _capture_input(encoder: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The first input of ``module`` when ``encoder`` runs on ``ids``; the pass stops there."""
    seen: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        seen.append((args[0] if args else next(iter(kwargs.values()))).detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        encoder(ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not called by {type(encoder).__name__}")
    return seen[0]


def _gather_rows(batches: list[torch.Tensor], where: dict[str, tuple[int, int]], prompts, positions,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The requested rows in request order, copied with one ``index_select`` per batch: indexing
    each prompt's states with a Python list cost ~0.5 ms a prompt (a 100-concept recipe's
    16 k prompts spent more time there than in the encoder)."""
    source: dict[int, list[int]] = defaultdict(list)
    dest: dict[int, list[int]] = defaultdict(list)
    cursor = 0
    for prompt, pos in zip(prompts, positions):
        if not len(pos):
            continue
        batch, first = where[prompt]
        source[batch].extend(first + int(q) for q in pos)
        dest[batch].extend(range(cursor, cursor + len(pos)))
        cursor += len(pos)
    if not cursor:
        return torch.empty(0, dtype=dtype, device=device)
    rows = torch.empty((cursor, *batches[0].shape[1:]), dtype=dtype, device=batches[0].device)
    for batch, src in source.items():
        index = torch.tensor(src, dtype=torch.long, device=rows.device)
        rows[torch.tensor(dest[batch], dtype=torch.long, device=rows.device)] = batches[batch].index_select(0, index)
    return rows


def _gather(states: torch.Tensor, positions) -> torch.Tensor:
    return torch.cat([states[n, list(pos)] for n, pos in enumerate(positions) if len(pos)])


class PipelineModel:
    """A diffusers pipeline seen as a ``LoadedModel`` by :class:`PromptEncoder` (the benchmark's
    baselines and LocoGen hold pipelines)."""

    def __init__(self, pipeline):
        from compiler.models.load import build_registry

        self.pipeline = pipeline
        self.registry = build_registry(pipeline)
        self.family = self.registry.family

    def text_encoder(self, component: str = "text_encoder") -> torch.nn.Module:
        return getattr(self.pipeline, component)

    def tokenizer_for(self, component: str = "text_encoder"):
        return getattr(self.pipeline, component.replace("text_encoder", "tokenizer"))
