"""UCE: Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024).

Closed form over **every** cross-attention ``to_k`` and ``to_v`` of the UNet. For edited rows
``c`` (the concept's token states) with targets ``v* = Ŵ c_target`` (what the old weights give
the replacement's token states) and preserved rows ``c_p`` (which keep ``Ŵ c_p``)::

    W = (λŴ + e Σ v* cᵀ + p Σ Ŵ c_p c_pᵀ) (λI + e Σ c cᵀ + p Σ c_p c_pᵀ)⁻¹

Defaults are those of the public code's erase script: λ = 0.5 (its ``lamb``, passed to
``train_erase.py``), erase scale e = 1, preserve scale p = 0.1, the "replace" technique
(``v* = Ŵ c_target``), and both K and V edited.

Rows: the concept's prompt templates (the same prompt pairs editc solves on), aligned from the
last concept token to the end of the 77-token context (:func:`aligned_token_rows`, UCE's rule).
Preserved concepts: the generic captions that editc's compile preserves by default, every one of
their 77 token states, as UCE takes its retain texts. One Cholesky factorization serves every
layer (the published code inverts per layer; the result is the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from compiler.bench.baselines import (BaselineResult, EditTask, aligned_token_rows, all_token_rows,
                             closed_form_kv_update, synchronize)


@dataclass(frozen=True)
class UCEConfig:
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 0.1


def uce_edit(model, task: EditTask, config: UCEConfig = UCEConfig(), preserve_prompts: list[str] | None = None,
             ) -> BaselineResult:
    """UCE's new K/V weights for ``task`` on a ``LoadedModel`` (its pipeline is not modified)."""
    started = time.perf_counter()
    pipe = model.pipeline
    sources, targets = aligned_token_rows(pipe, task.prompt_pairs(), task.concept, task.replacement)
    preserve_prompts = task.preserve_prompts() if preserve_prompts is None else preserve_prompts
    preserved = all_token_rows(pipe, preserve_prompts)
    gram = config.erase_scale * sources.T @ sources
    cross = config.erase_scale * targets.T @ sources
    new = closed_form_kv_update(pipe, model.registry, gram, cross, config.lam,
                                preserve_gram=preserved.T @ preserved, preserve_scale=config.preserve_scale)
    synchronize(pipe.unet.device)
    seconds = time.perf_counter() - started
    info = {"rows": int(sources.shape[0]), "preserve_rows": int(preserved.shape[0]),
            "preserve_prompts": len(preserve_prompts), "lambda": config.lam, "erase_scale": config.erase_scale,
            "preserve_scale": config.preserve_scale, "tensors": len(new)}
    return BaselineResult("uce", new, seconds, info)
