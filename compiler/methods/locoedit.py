"""LocoEdit (Basu et al., ICML 2024): closed-form update of the located UNet cross-attention
layers' ``to_k``/``to_v`` so that the concept's token rows produce what the old weights gave the
replacement's: ``W = (XᵀX + λI)⁻¹(XᵀX_target Ŵ + λŴ)``. All LocoEdit edits of a recipe are rows
of one ridge regression: their layers are united and share one factorization for K and V."""

from __future__ import annotations

from compiler.methods.base import AutoChoice, EditMethod, Solved


class LocoEdit(EditMethod):
    name = "locoedit"
    title = "LocoEdit"
    summary = "rewrite the UNet cross-attention K/V of the located layers (closed form)"
    edits_unet_layers = True
    padding_statistics = True

    def auto_choice(self, edit, family):
        if not family.causal_text_encoder:
            return None  # T5's bidirectional attention spreads the concept over every token
        return AutoChoice(None, "auto: LocoEdit on the located cross-attention K/V (works on every "
                                "CLIP-conditioned family)")

    def build_rows(self, context, plans):
        return context.context_rows()

    def solve(self, context, plans, rows):
        """One ridge regression for every LocoEdit edit: each edit's statistics formed from its
        own rows and summed (the rows of all edits are never held in float64 at once), layers
        united."""
        import torch

        from compiler import solve
        from compiler.methods import rows as shared

        model, lam, device = context.model, context.lam, context.device
        # Every concept weighs the same; an edit's own λ enters relative to the recipe's λ.
        counts = [len(rows.by_plan[id(p)][0]) for p in plans]
        per_edit = shared.concept_weights(counts, [p.lam for p in plans], lam, context.concept_weighting)
        problems = []
        for plan, n, weight in zip(plans, counts, per_edit):
            # Cached rows come back on the CPU, fresh ones on the encoder's device: all to the device.
            x_orig, x_target = (r.to(device) for r in rows.by_plan[id(plan)])
            weights = shared.row_weights(n, weight, rows.padding.get(id(plan)))
            problems.append(solve.build_problem(x_orig, x_target, lam=lam, row_weights=weights))
        problem = problems[0] if len(problems) == 1 else solve.combine_problems(problems)
        if rows.preserve is not None:
            problem = solve.add_preservation(problem, rows.preserve)
        layers = sorted({j for p in plans for j in p.layers})
        names = [f"unet/{name}" for layer in (model.registry.cross_attention[j] for j in layers)
                 for name in (layer.to_k, layer.to_v)]
        old = model.read_tensors(names)  # as stored: the result keeps the checkpoint's dtype
        solver = shared.solver_choice()
        held = None
        if solver == "constrained":
            held = shared.held_directions(context, rows)
            result = solve.solve_ridge_constrained(problem, old, held)
        else:
            result = solve.solve_ridge(problem, old)
        info = {
            "method": "locoedit", "layers": layers, "rows": problem.n_rows, "preserve_rows": problem.n_preserve_rows,
            "context_dim": problem.dim, "lambda": lam, "condition_number": result.condition_number,
            "solve_seconds": result.seconds, "tensors": sorted(old), "solver": solver,
        }
        if held is not None:
            info["held_exactly"] = int(held.shape[1])
        return [Solved(result.new_weights, info)]
