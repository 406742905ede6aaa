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


def quickfix_rows(tokenizer, plans, lam, weighting: str = "concept") -> QuickFixRows:
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
    per_edit = shared.concept_weights(counts, [p.lam for p in plans], lam, weighting)
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
        return edit.option("site") or DEFAULT_SITE

    def capture_point(self, model):
        """The input of layer 0's ``out_proj``: the keys this method remaps."""
        spec = model.registry.text_layer0[0]
        return (model.text_encoder(spec.component).get_submodule(spec.module_name),
                f"{spec.component}.{spec.module_name}")

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
        """The inputs of layer 0's out_proj (the encoder stops there); the preservation keys'
        ``PᵀP`` from the cache."""
        from compiler import resolve

        encoder, tokenizer = context.encoder, context.tokenizer
        spec = context.model.registry.text_layer0[0]
        out_proj = context.model.text_encoder(spec.component).get_submodule(spec.module_name)
        rows = quickfix_rows(tokenizer, plans, context.lam, context.concept_weighting)
        n = int(rows.weights.numel())
        inputs = encoder.module_inputs(rows.sources + rows.targets, rows.source_positions + rows.target_positions,
                                       out_proj, spec.component)
        preserve_keys = context.preserve_gram(
            f"inputs:{spec.component}/{spec.module_name}", [spec.component],
            lambda prompts: resolve.all_token_positions(tokenizer, prompts),
            lambda prompts, positions: encoder.module_inputs(prompts, positions, out_proj, spec.component))
        return inputs[:n], inputs[n:], preserve_keys, rows.weights

    def _solve_out_proj(self, context, keys):
        import torch

        from compiler import solve

        keys, target_keys, preserve_keys, weights = keys
        device = context.device
        keys, target_keys = keys.to(device), target_keys.to(device)
        spec = context.model.registry.text_layer0[0]
        qualified = f"{spec.component}/{spec.weight}"
        old = context.model.read_tensors([qualified])[qualified]
        # what the unedited layer gives the replacement
        values = target_keys.double() @ old.to(device=device, dtype=torch.float64).T
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

        encoder, tokenizer = context.encoder, context.tokenizer
        spec = context.model.registry.text_layer0[0]
        attention = context.model.text_encoder(spec.component).get_submodule(spec.module_name.rsplit(".", 1)[0])
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "num_heads")):
            raise UserError(f"{spec.component}: its layer-0 attention ({type(attention).__name__}) has no "
                            "separate q/k/v projections; use site: out_proj")
        rows = quickfix_rows(tokenizer, plans, context.lam, context.concept_weighting)
        mixed = encoder.value_keys(rows.sources + rows.targets, rows.source_positions + rows.target_positions,
                                   attention, spec.component)
        n = len(rows.weights)  # key rows per side (source and target positions pair up)
        preserve_keys = context.preserve_gram(
            f"value_keys:{spec.component}/{spec.module_name}", [spec.component],
            lambda prompts: resolve.all_token_positions(tokenizer, prompts),
            lambda prompts, positions: encoder.value_keys(prompts, positions, attention, spec.component))
        return mixed[:, :n], mixed[:, n:], preserve_keys, rows.weights

    def _solve_v_proj(self, context, keys):
        from compiler import solve

        keys, target_keys, preserve_keys, weights = keys
        keys, target_keys = keys.to(context.device), target_keys.to(context.device)
        spec = context.model.registry.text_layer0[0]
        weight_name = spec.weight.replace("out_proj.weight", "v_proj.weight")
        qualified = f"{spec.component}/{weight_name}"
        old = context.model.read_tensors([qualified])[qualified]
        result = solve.solve_value_heads(keys, target_keys, old, lam=context.lam, preserve_keys=preserve_keys,
                                         name=qualified, row_weights=weights)
        info = {
            "method": "quickfix", "site": "v_proj", "heads": int(keys.shape[0]), "rows": result.n_rows,
            "preserve_rows": result.n_preserve_rows, "lambda": context.lam,
            "condition_number": result.condition_number, "solve_seconds": result.seconds, "tensors": [qualified],
        }
        return Solved(result.new_weights, info)
