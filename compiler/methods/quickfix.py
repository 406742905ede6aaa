"""Diff-QuickFix (Basu et al., ICLR 2024): closed-form edit of the text encoder's layer-0
self-attention so that the concept's keys map to the values the unedited layer gives the
replacement: ``W = (λ W_old + Σ v kᵀ)(λ I + Σ k kᵀ)⁻¹``. Two sites:

- ``out_proj`` (the paper's): keys are the projection's inputs at the last subject token (and EOS);
- ``v_proj``: keys are the layer's inputs mixed by its own attention weights, one solve per head.
  Where layer 0 already resolves a fact (the concept's ``out_proj`` input is close to its old
  answer's), only ``v_proj`` can tell the two apart.

All edits at one site share one solve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from compiler.errors import UserError
from compiler.methods.base import AutoChoice, EditMethod, MethodField, Solved

if TYPE_CHECKING:
    import torch

SITES = ("out_proj", "v_proj")  # which projection of the text encoder's layer-0 attention
DEFAULT_SITE = "out_proj"


def _parse_site(validator, value, field_path: str) -> str:
    return validator.choice(value, field_path, SITES)


@dataclass
class QuickFixRows:
    """The prompts and token positions of all Diff-QuickFix edits at one site, in one order, and
    each key row's weight (every concept weighs the same; an edit's own λ relative to the
    recipe's)."""

    sources: list[str]
    targets: list[str]
    source_positions: list[list[int]]
    target_positions: list[list[int]]
    weights: torch.Tensor


def quickfix_rows(tokenizer, plans, lam) -> QuickFixRows:
    import torch

    from compiler.methods import rows as shared

    rows = QuickFixRows([], [], [], [], torch.empty(0))
    counts = []
    for plan in plans:
        s_pos, t_pos = shared.positions_by_prompt(tokenizer, plan)
        rows.sources += [pair.source for pair in plan.pairs]
        rows.targets += [pair.target for pair in plan.pairs]
        rows.source_positions += s_pos
        rows.target_positions += t_pos
        counts.append(sum(len(p) for p in s_pos))
    # Every concept weighs the same; an edit's own λ enters relative to the recipe's λ.
    per_edit = shared.concept_weights(counts, [p.lam for p in plans], lam)
    rows.weights = torch.tensor([w for n, w in zip(counts, per_edit) for _ in range(n)], dtype=torch.float64)
    return rows


class QuickFix(EditMethod):
    name = "quickfix"
    title = "Diff-QuickFix"
    summary = "rewrite the text encoder's first attention layer (Diff-QuickFix, closed form)"
    edits_unet_layers = False
    layers_refusal = ("method quickfix edits the text encoder's layer-0 output projection, not "
                      "UNet layers; remove 'layers' or use method locoedit or neurons")
    fields = (MethodField("site", _parse_site, None),)

    def auto_choice(self, edit, family):
        if edit.attribute == "fact" and len(family.text_encoders) == 1:
            # The text encoder's layer 0 resolves a fact: after it, "the british monarch" and its
            # old answer have near-identical states, so a UNet K/V edit moves both (measured on
            # the toy world, bench/edit_toy.py); layer 0's v_proj still sees them apart.
            return AutoChoice("v_proj", "auto: Diff-QuickFix at the text encoder's layer-0 v_proj "
                                        "(a fact; keeps its old answer's own prompts)")
        return None

    def site(self, edit):
        return edit.site or DEFAULT_SITE

    def default_eos(self, site):
        """At layer 0's ``v_proj`` the EOS row is mostly the tokens around the concept (a style,
        a setting): remapping it drags them along, and every later position already reads the
        concept's edited value through attention (measured on the toy world,
        ``bench/fact_probe.py --eos``: king charles for the monarch in 11/16 images with EOS
        rows, 14/16 without, and his own prompts 14 → 12/16 with them)."""
        return site != "v_proj"

    def bench_variants(self):
        return {"quickfix": ({"site": "out_proj"}, "editc Diff-QuickFix"),
                "quickfix-v": ({"site": "v_proj"}, "editc Diff-QuickFix at v_proj")}

    def where(self, edit):
        return f"text encoder layer 0 {self.site(edit)}"

    def describe(self, plan):
        return {"site": plan.site}

    def build_rows(self, context, plans):
        """Per site, the layer's keys for the sources, targets and preservation prompts."""
        return {site: builder(context, at_site)
                for site, builder in (("out_proj", self._out_proj_keys), ("v_proj", self._v_proj_keys))
                if (at_site := [p for p in plans if p.site == site])}

    def solve(self, context, plans, rows):
        solvers = {"out_proj": self._solve_out_proj, "v_proj": self._solve_v_proj}
        return [solvers[site](context, keys) for site, keys in rows.items()]

    # -- out_proj --------------------------------------------------------------------------
    def _out_proj_keys(self, context, plans):
        from compiler import resolve

        pipe, tokenizer, preserve = context.pipeline, context.tokenizer, context.preserve
        spec = context.model.registry.text_layer0[0]
        out_proj = getattr(pipe, spec.component).get_submodule(spec.module_name)
        rows = quickfix_rows(tokenizer, plans, context.lam)
        n = len(rows.sources)
        inputs = resolve.encode_context(pipe, rows.sources + rows.targets + preserve, capture=out_proj)
        keys = resolve.gather_rows(inputs[:n], rows.source_positions)
        target_keys = resolve.gather_rows(inputs[n : 2 * n], rows.target_positions)
        preserve_keys = resolve.gather_rows(inputs[2 * n :], resolve.all_token_positions(tokenizer, preserve))
        return keys, target_keys, preserve_keys, rows.weights

    def _solve_out_proj(self, context, keys):
        from compiler import solve
        from compiler.fuse import get_parameter

        keys, target_keys, preserve_keys, weights = keys
        spec = context.model.registry.text_layer0[0]
        qualified = f"{spec.component}/{spec.weight}"
        old = get_parameter(context.pipeline, qualified).detach()
        values = target_keys.double() @ old.double().T  # what the unedited layer gives the replacement
        result = solve.solve_quickfix(keys, values, old, lam=context.lam, preserve_keys=preserve_keys,
                                      name=qualified, row_weights=weights)
        info = {
            "method": "quickfix", "site": "out_proj", "rows": result.n_rows,
            "preserve_rows": result.n_preserve_rows, "lambda": context.lam,
            "condition_number": result.condition_number, "solve_seconds": result.seconds, "tensors": [qualified],
        }
        return Solved(result.new_weights, info)

    # -- v_proj ----------------------------------------------------------------------------
    def _v_proj_keys(self, context, plans):
        """Keys mixed by the layer-0 attention, per head."""
        from compiler import resolve

        pipe, tokenizer, preserve = context.pipeline, context.tokenizer, context.preserve
        spec = context.model.registry.text_layer0[0]
        attention = getattr(pipe, spec.component).get_submodule(spec.module_name.rsplit(".", 1)[0])
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "num_heads")):
            raise UserError(f"{spec.component}: its layer-0 attention ({type(attention).__name__}) has no "
                            "separate q/k/v projections; use site: out_proj")
        rows = quickfix_rows(tokenizer, plans, context.lam)
        positions = rows.source_positions + rows.target_positions + resolve.all_token_positions(tokenizer, preserve)
        mixed = resolve.attention_value_keys(pipe, spec.component, attention,
                                             rows.sources + rows.targets + preserve, positions)
        n = len(rows.weights)  # key rows per side (source and target positions pair up)
        return mixed[:, :n], mixed[:, n : 2 * n], mixed[:, 2 * n :], rows.weights

    def _solve_v_proj(self, context, keys):
        from compiler import solve
        from compiler.fuse import get_parameter

        keys, target_keys, preserve_keys, weights = keys
        spec = context.model.registry.text_layer0[0]
        weight_name = spec.weight.replace("out_proj.weight", "v_proj.weight")
        qualified = f"{spec.component}/{weight_name}"
        old = get_parameter(context.pipeline, qualified).detach()
        result = solve.solve_value_heads(keys, target_keys, old, lam=context.lam, preserve_keys=preserve_keys,
                                         name=qualified, row_weights=weights)
        info = {
            "method": "quickfix", "site": "v_proj", "heads": int(keys.shape[0]), "rows": result.n_rows,
            "preserve_rows": result.n_preserve_rows, "lambda": context.lam,
            "condition_number": result.condition_number, "solve_seconds": result.seconds, "tensors": [qualified],
        }
        return Solved(result.new_weights, info)
