"""Baselines that editc is benchmarked against, implemented on the same models and prompts.

- :mod:`compiler.bench.baselines.esd`: ESD (Gandikota et al., ICCV 2023), fine-tuning with negative
  guidance; ESD-x trains the cross-attention parameters.
- :mod:`compiler.bench.baselines.concept_ablation`: Concept Ablation (Kumari et al., ICCV 2023), the
  model-based variant, fine-tuning cross-attention K/V.
- :mod:`compiler.bench.baselines.uce`: UCE (Gandikota et al., WACV 2024), closed form over every
  cross-attention K/V, with preservation.
- :mod:`compiler.bench.baselines.time_edit`: TIME (Orgad et al., ICCV 2023), closed form over every
  cross-attention K/V, regularised towards the old weights.

Every method takes the same :class:`EditTask` and returns a :class:`BaselineResult` whose
``new_tensors`` use editc's qualified names (``unet/<parameter>``), so that the harness applies
them with :func:`compiler.fuse.fuse_weights` and measures them with the same verify code as
editc's own edits. Nothing here modifies the pipeline it is given.

The shared pieces live here: the task, the result, prompt encoding for SD-1/2 and SD-XL UNets
(SD-XL also needs pooled text embeddings and time ids), and the UCE-style alignment of
concept and replacement tokens that both closed-form peers use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from compiler import resolve
from compiler.device import synchronize  # noqa: F401 - the baselines time GPU work with it
from compiler.encode import PromptEncoder


_VOCABULARY = []


def use_vocabulary(vocab) -> None:
    """The vocabulary every task's prompts come from (set to the benchmarked model's)."""
    _VOCABULARY[:] = [vocab]


def vocabulary():
    """The benchmarked model's vocabulary; by default the embedded toy model's."""
    if not _VOCABULARY:
        from compiler.models.load import TOY_PIPELINE

        use_vocabulary(resolve.vocabulary_of(TOY_PIPELINE))
    return _VOCABULARY[0]


@dataclass(frozen=True)
class EditTask:
    """One edit: prompts with ``concept`` should behave like prompts with ``replacement``.

    ``attribute`` (style | object | fact) picks the prompt templates, exactly as editc's
    resolve stage picks them, so that every method sees the same prompts.
    """

    concept: str
    replacement: str
    attribute: str

    def prompt_pairs(self) -> list[resolve.PromptPair]:
        return resolve.prompt_pairs(self.concept, self.replacement, self.attribute, vocabulary=vocabulary())

    def concept_prompts(self) -> list[str]:
        return [pair.source for pair in self.prompt_pairs()]

    def preserve_prompts(self) -> list[str]:
        """The generic captions editc's compile keeps in place by default (none mention the
        concept or the replacement)."""
        return resolve.default_preserve_prompts([self.concept, self.replacement], vocabulary())


@dataclass
class BaselineResult:
    """New tensors (qualified names, the model's dtype) and what it took to make them."""

    method: str
    new_tensors: dict[str, Tensor]
    seconds: float
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- conditioning
@dataclass
class Conditioning:
    """What a UNet needs besides x_t and t for a batch of prompts.

    ``states`` are the cross-attention contexts (N, 77, d). SD-XL UNets also take the pooled
    text embedding and the size/crop time ids (``added``); SD-1/2 UNets do not (None).
    """

    states: Tensor
    added: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.states.shape[0]

    def select(self, index) -> Conditioning:
        index = torch.as_tensor(index, dtype=torch.long, device=self.states.device)
        added = None if self.added is None else {k: v[index] for k, v in self.added.items()}
        return Conditioning(self.states[index], added)

    def cat(self, other: Conditioning) -> Conditioning:
        added = None
        if self.added is not None:
            added = {k: torch.cat([self.added[k], other.added[k]]) for k in self.added}
        return Conditioning(torch.cat([self.states, other.states]), added)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.states}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


def is_sdxl(pipe) -> bool:
    """Whether the UNet also takes pooled text embeddings and time ids (the family's rule)."""
    from compiler.models.families import family_of_pipeline

    return family_of_pipeline(pipe).pooled_text_embeds


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch: int = 256) -> Conditioning:
    """Contexts exactly as the pipeline computes them for generation (77 tokens)."""
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    states, pooled = [], []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        if is_sdxl(pipe):
            embeds, _, pooled_embeds, _ = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=False)
            pooled.append(pooled_embeds)
        else:
            embeds = pipe.encode_prompt(chunk, device, 1, False)[0]
        states.append(embeds)
    states = torch.cat(states).to(dtype)
    if not is_sdxl(pipe):
        return Conditioning(states)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).repeat(len(prompts), 1)
    return Conditioning(states, {"text_embeds": torch.cat(pooled).to(dtype), "time_ids": time_ids})


def predict(unet, latents: Tensor, timesteps, cond: Conditioning) -> Tensor:
    """The UNet's output (noise, or v for v-prediction models) for a batch."""
    return unet(latents, timesteps, **cond.unet_kwargs()).sample


def latent_shape(pipe, batch: int) -> tuple[int, int, int, int]:
    size = pipe.unet.config.sample_size
    return (batch, pipe.unet.config.in_channels, size, size)


# ----------------------------------------------------------------------------- parameters
def cross_attention_kv_names(registry) -> list[str]:
    """Qualified names of every cross-attention ``to_k``/``to_v`` weight, in the papers' order."""
    names = []
    for layer in registry.cross_attention:
        names += [f"unet/{layer.to_k}", f"unet/{layer.to_v}"]
    return names


def trainable_copy(unet: torch.nn.Module, names: list[str], learning_rate: float):
    """A copy of ``unet`` in train mode whose parameters ``names`` (only) require grad, and an
    Adam optimizer over them: the fine-tuning baselines' shared start (the original stays frozen)."""
    import copy

    unet = copy.deepcopy(unet)
    trainable = set(names)
    for name, param in unet.named_parameters():
        param.requires_grad_(name in trainable)
    unet.train()
    optimizer = torch.optim.Adam([p for n, p in unet.named_parameters() if n in trainable], lr=learning_rate)
    return unet, optimizer


def trained_tensors(module: torch.nn.Module, names: list[str], component: str = "unet") -> dict[str, Tensor]:
    """The named parameters of a trained copy, detached, under qualified names."""
    params = dict(module.named_parameters())
    return {f"{component}/{name}": params[name].detach().clone() for name in names}


# ----------------------------------------------------------------------------- UCE alignment
def aligned_token_rows(pipe, pairs: list[resolve.PromptPair], concept: str, replacement: str,
                       ) -> tuple[Tensor, Tensor]:
    """Source and target context rows for the closed-form peers, aligned as UCE aligns them.

    For each pair, the 77-token contexts of the source and the target prompt are cut at the
    last token of the concept and of the replacement; from there on, position by position to
    the end of the context (the EOS and padding states included), a source row is mapped to the
    target row. The longer remainder is shortened so that both have the same length (UCE's
    ``final_token_idx`` rule, generalized from "the prompt is the concept" to templates where
    the concept sits anywhere). Returns float64 (R, d) source rows and target rows.
    """
    tokenizer = pipe.tokenizer
    states = PromptEncoder(pipe).contexts([p.source for p in pairs] + [p.target for p in pairs]).double()
    source_states, target_states = states[: len(pairs)], states[len(pairs) :]
    length = states.shape[1]
    sources, targets = [], []
    for n, pair in enumerate(pairs):
        i = resolve.last_token_index(tokenizer, pair.source, concept)
        j = resolve.last_token_index(tokenizer, pair.target, replacement)
        farthest = max(i, j)
        sources.append(source_states[n, i : length - (farthest - i)])
        targets.append(target_states[n, j : length - (farthest - j)])
    return torch.cat(sources), torch.cat(targets)


def all_token_rows(pipe, prompts: list[str]) -> Tensor:
    """Every one of the 77 context rows of each prompt (UCE's preservation rows), float64."""
    states = PromptEncoder(pipe).contexts(prompts).double()
    return states.reshape(-1, states.shape[-1])


def closed_form_kv_update(pipe, registry, gram: Tensor, cross: Tensor, lam: float,
                          preserve_gram: Tensor | None = None, preserve_scale: float = 0.0,
                          ) -> dict[str, Tensor]:
    """``W = (λŴ + Ŵ·cross + s·Ŵ·P) (λI + gram + s·P)⁻¹`` for every cross-attention K and V.

    ``gram = Σ c cᵀ`` over source rows, ``cross = Σ c_target cᵀ`` (so ``Ŵ·cross = Σ v* cᵀ``
    with ``v* = Ŵ c_target``), ``P = Σ c_p c_pᵀ`` over preserved rows. The right factor is the
    same for every layer and both K and V, so it is factorized once (Cholesky, float64).
    """
    dim = gram.shape[0]
    eye = torch.eye(dim, dtype=torch.float64, device=gram.device)
    normal = lam * eye + gram
    left = lam * eye + cross
    if preserve_gram is not None and preserve_scale:
        normal = normal + preserve_scale * preserve_gram
        left = left + preserve_scale * preserve_gram
    normal = (normal + normal.T) / 2
    factor = torch.linalg.cholesky(normal)
    # W_new = Ŵ left normal⁻¹  ⇔  normal W_newᵀ = leftᵀ Ŵᵀ; one solve for all layers at once.
    change = torch.cholesky_solve(left.T.contiguous(), factor)  # normal⁻¹ leftᵀ (d × d)
    new = {}
    for name in cross_attention_kv_names(registry):
        component, param = name.split("/", 1)
        old = getattr(pipe, component).get_parameter(param).detach()
        new[name] = (old.double() @ change.T.to(old.device)).to(old.dtype)
    return new
