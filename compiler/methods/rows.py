"""What the methods' solves share: the planned edits, the preservation prompts and the UNet
context rows (text-encoder outputs at each edit's positions), embedded once for every method
that reads them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from compiler import resolve


@dataclass
class ContextRows:
    """Text-encoder output rows: per plan (``id(plan)``) the source and target rows, plus the
    preservation rows, all at the same token length."""

    by_plan: dict[int, tuple[torch.Tensor, torch.Tensor]]
    preserve: torch.Tensor


@dataclass
class RowContext:
    """One compile's shared inputs. ``plans`` are all planned edits of the recipe (every
    method's), ``preserve`` the preservation prompts, ``lam`` the recipe's λ; ``timings``
    collects embedding time spent on shared rows."""

    model: object
    plans: list
    preserve: list[str]
    lam: float
    timings: dict[str, float] = field(default_factory=dict)
    _context_rows: ContextRows | None = None

    @property
    def pipeline(self):
        return self.model.pipeline

    @property
    def tokenizer(self):
        return self.model.pipeline.tokenizer

    def context_rows(self) -> ContextRows:
        """The UNet's cross-attention context rows of every plan, embedded in one pass on first
        use (LocoEdit and neurons read the same rows)."""
        if self._context_rows is None:
            self._context_rows = self._embed_context_rows()
        return self._context_rows

    def _embed_context_rows(self) -> ContextRows:
        plans, preserve, tokenizer = self.plans, self.preserve, self.tokenizer
        sources = [pr.source for p in plans for pr in p.pairs]
        targets = [pr.target for p in plans for pr in p.pairs]
        # Trailing (EOS and padding) rows need the pipeline's full 77-token contexts.
        full = any(p.eos for p in plans if p.method_plugin.edits_unet_layers)
        contexts = resolve.encode_context(self.pipeline, sources + targets + preserve, full_length=full)
        src_ctx, tgt_ctx = contexts[: len(sources)], contexts[len(sources) : len(sources) + len(targets)]
        pres_ctx = contexts[len(sources) + len(targets) :]
        offset = 0
        by_plan = {}
        for plan in plans:
            n = len(plan.pairs)
            s_pos, t_pos = positions_by_prompt(tokenizer, plan, contexts.shape[1] if full else None)
            by_plan[id(plan)] = (
                resolve.gather_rows(src_ctx[offset : offset + n], s_pos),
                resolve.gather_rows(tgt_ctx[offset : offset + n], t_pos),
            )
            offset += n
        length = contexts.shape[1] if full else None
        preserve_rows = resolve.gather_rows(pres_ctx, resolve.all_token_positions(tokenizer, preserve, length))
        return ContextRows(by_plan, preserve_rows)


def positions_by_prompt(tokenizer, plan, trailing_to: int | None = None):
    """Source and target token positions of each of the plan's prompt pairs."""
    edit = plan.edit
    return resolve.pair_positions(tokenizer, plan.pairs, edit.concept, edit.replacement, plan.eos, trailing_to)


def timed(timings: dict[str, float], key: str):
    """``with timed(t, "embed"): ...`` adds the block's seconds to ``t[key]``."""
    return _Timer(timings, key)


class _Timer:
    def __init__(self, timings: dict[str, float], key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.start


def concept_weights(row_counts: list[int], lambdas: list[float], recipe_lam: float) -> list[float]:
    """Per edit, the weight of each of its rows so that every concept counts equally in the one
    ridge solve, however many rows its templates make: ``(λ/λ_e) · (N / (E·n_e))`` for E edits
    of n_e rows (N in all). An edit's own λ_e keeps its meaning (a single edit's rows weigh
    ``λ/λ_e``, as before), and the total weight of all edit rows stays N."""
    total, count = sum(row_counts), len(row_counts)
    return [(recipe_lam / lam) * (total / (count * n)) for n, lam in zip(row_counts, lambdas)]
