"""Neuron-level editing (Basu et al., ICML 2024): z-score each output neuron of the located
layers' ``to_k``/``to_v`` between prompts with the concept and the replacement's, and ablate the
``neurons_top_k`` most different ones."""

from __future__ import annotations

from compiler.methods.base import EditMethod, MethodField, Solved

DEFAULT_NEURONS_TOP_K = 50  # ICML 2024 ablates 30/50/100 of SD-1.5's 1280 neurons


MAX_NEURONS_TOP_K = 65536  # also checked against the located layers' width at compile time


def _parse_top_k(validator, value, field_path: str) -> int:
    return validator.integer(value, field_path, 1, MAX_NEURONS_TOP_K)


class Neurons(EditMethod):
    name = "neurons"
    title = "neurons"
    summary = "switch off the located layers' K/V neurons most tied to the concept"
    edits_unet_layers = True
    fields = (MethodField("neurons_top_k", _parse_top_k, DEFAULT_NEURONS_TOP_K, with_auto=True),)

    def edit_details(self, edit):
        top_k = edit.option("neurons_top_k", DEFAULT_NEURONS_TOP_K)
        return [f"top-{top_k} neurons"] if top_k != DEFAULT_NEURONS_TOP_K else []

    def build_rows(self, context, plans):
        return context.context_rows()

    def solve(self, context, plans, rows):
        """Neuron-level ablation: zero the top-k z-scored K/V output neurons of the located layers.

        SD's ``to_k``/``to_v`` have no bias, so a weight edit can only make a neuron output 0
        (the papers' public code sets them to the neutral group's mean at run time).
        """
        import torch

        from compiler import solve
        from compiler.errors import UserError

        model = context.model
        new = {}
        counts = {}
        for plan in plans:
            with_rows, without_rows = (r.to(context.device) for r in rows.by_plan[id(plan)])
            for j in plan.layers:
                layer = model.registry.cross_attention[j]
                for name in (layer.to_k, layer.to_v):
                    qualified = f"unet/{name}"
                    weight = new.get(qualified)
                    if weight is None:
                        weight = model.read_tensors([qualified])[qualified]
                    w64 = weight.to(device=context.device, dtype=torch.float64)
                    top_k = plan.edit.option("neurons_top_k", DEFAULT_NEURONS_TOP_K)
                    if top_k > w64.shape[0]:
                        raise UserError(f"edit '{plan.edit.concept}': neurons_top_k {top_k} exceeds "
                                        f"the {w64.shape[0]} output neurons of {qualified}; use at most {w64.shape[0]}")
                    idx = solve.zscore_neurons(with_rows.double() @ w64.T, without_rows.double() @ w64.T, top_k)
                    new[qualified] = solve.ablate_neurons(weight, None, idx).weight
                    counts[qualified] = int(idx.numel())
        return [Solved(new, {"method": "neurons", "tensors": sorted(new), "ablated": counts,
                             "mode": "zero (no bias in K/V)"})]
