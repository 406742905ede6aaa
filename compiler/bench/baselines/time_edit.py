"""TIME: Text-to-Image Model Editing (Orgad, Kawar, Belinkov; ICCV 2023).

Closed form over the ``to_k`` and ``to_v`` projections of **every** cross-attention layer:
source token states ``c_src`` (prompts with the concept) should give what the old weights give
the destination states ``c_dest`` (the same prompts with the replacement), while the weights
stay close to the old ones::

    W = (λŴ + Σ Ŵ c_dest c_srcᵀ) (λI + Σ c_src c_srcᵀ)⁻¹,   λ = 0.1

TIME has no preservation term; λ alone keeps the rest of the model. Rows are aligned as for
UCE (:func:`compiler.bench.baselines.aligned_token_rows`), on the same prompt pairs editc solves on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from compiler.bench.baselines import BaselineResult, EditTask, aligned_token_rows, closed_form_kv_update, synchronize


@dataclass(frozen=True)
class TIMEConfig:
    lam: float = 0.1


def time_edit(model, task: EditTask, config: TIMEConfig = TIMEConfig()) -> BaselineResult:
    """TIME's new K/V weights for ``task`` on a ``LoadedModel`` (its pipeline is not modified)."""
    started = time.perf_counter()
    pipe = model.pipeline
    sources, destinations = aligned_token_rows(pipe, task.prompt_pairs(), task.concept, task.replacement)
    new = closed_form_kv_update(pipe, model.registry, sources.T @ sources, destinations.T @ sources, config.lam)
    synchronize(pipe.unet.device)
    seconds = time.perf_counter() - started
    return BaselineResult("time", new, seconds, {"rows": int(sources.shape[0]), "lambda": config.lam,
                                                 "tensors": len(new)})
