"""The gates: thresholds from the recipe's ``verify`` section applied to the group scores.

Per edit (``edits[i]``):

- ``efficacy``. Style and object edits: the judge may still identify the concept in at most
  ``efficacy_max_accuracy`` of the edited model's images of the concept's prompts, *and* in
  fewer of them than in the base model's. Fact edits: the replacement (the new fact) must be
  identified in at least ``fact_min_accuracy`` of them, and in more than with the base model.
  The comparison with the base model is what makes a useless edit fail even when the judge
  never saw the concept in the first place: an edit must be seen to do something.
- ``generalization``: on held-out paraphrases, the concept (for facts: the outdated fact) may
  be identified in at most ``generalization_max_accuracy`` of the edited images. Reported
  without gating when the recipe leaves that threshold unset.
- ``specificity``: over the edit's neighbouring concepts, the judge's accuracy may fall by at
  most ``specificity_max_drop`` from base to edited.

And once per recipe, ``generic.specificity``: the same drop limit on the generic prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.recipe import Edit, Recipe, VerifyGates
from compiler.verify.metrics import GroupResult
from compiler.verify.probes import EFFICACY, GENERALIZATION, GENERIC, SPECIFICITY


@dataclass
class GateResult:
    """One gate: a measured value against a threshold. ``skipped``: reported, not gated."""

    name: str  # "edits[0].efficacy", "generic.specificity"
    edit_index: int | None
    passed: bool
    skipped: bool
    metric: str  # what ``value`` measures, in words
    value: float
    comparison: str  # "<=" or ">="
    threshold: float | None
    message: str

    @property
    def failed(self) -> bool:
        return not self.passed and not self.skipped


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def efficacy_gate(edit: Edit, index: int, group: GroupResult, gates: VerifyGates) -> GateResult:
    name = f"edits[{index}].efficacy"
    if edit.attribute == "fact":
        value, before = group.edited.replacement_accuracy, group.base.replacement_accuracy
        threshold = gates.fact_min_accuracy
        metric = f"fraction of edited images of {edit.concept!r} prompts showing {edit.replacement!r}"
        if value < threshold:
            message = (f"{edit.replacement!r} shows in {_percent(value)} of the edited images of {edit.concept!r} "
                       f"prompts, below the required {_percent(threshold)} (base model: {_percent(before)})")
        elif value <= before:
            message = (f"{edit.replacement!r} shows in {_percent(value)} of the edited images, no more than with "
                       f"the base model ({_percent(before)}): the edit changed nothing measurable")
        else:
            message = f"{edit.replacement!r} shows in {_percent(value)} of the edited images (base model: {_percent(before)})"
        passed = value >= threshold and value > before
        return GateResult(name, index, passed, False, metric, value, ">=", threshold, message)

    value, before = group.edited.accuracy, group.base.accuracy
    threshold = gates.efficacy_max_accuracy
    metric = f"fraction of edited images of {edit.concept!r} prompts where the judge still sees {edit.concept!r}"
    if value > threshold:
        message = (f"the judge still sees {edit.concept!r} in {_percent(value)} of the edited images "
                   f"(allowed: {_percent(threshold)}; base model: {_percent(before)})")
    elif value >= before:
        message = (f"the base model shows {edit.concept!r} in only {_percent(before)} of the same images, so "
                   f"the edit's effect cannot be seen (edited: {_percent(value)})")
    else:
        message = f"{edit.concept!r} seen in {_percent(before)} of base images, {_percent(value)} of edited images"
    passed = value <= threshold and value < before
    return GateResult(name, index, passed, False, metric, value, "<=", threshold, message)


def generalization_gate(edit: Edit, index: int, group: GroupResult, gates: VerifyGates) -> GateResult:
    name = f"edits[{index}].generalization"
    threshold = gates.generalization_max_accuracy
    value, before = group.edited.accuracy, group.base.accuracy
    what = f"the outdated fact of {edit.concept!r}" if edit.attribute == "fact" else repr(edit.concept)
    metric = f"fraction of edited images of held-out paraphrases where the judge still sees {what}"
    observed = f"{what} seen in {_percent(before)} of base images, {_percent(value)} of edited images"
    if edit.attribute == "fact":
        observed += (f"; {edit.replacement!r} in {_percent(group.base.replacement_accuracy)} / "
                     f"{_percent(group.edited.replacement_accuracy)}")
    if threshold is None:
        return GateResult(name, index, True, True, metric, value, "<=", None,
                          observed + " (not gated: verify.generalization_max_accuracy is unset)")
    passed = value <= threshold
    message = observed if passed else f"{observed}, above the allowed {_percent(threshold)}"
    return GateResult(name, index, passed, False, metric, value, "<=", threshold, message)


def specificity_gate(name: str, index: int | None, group: GroupResult, gates: VerifyGates, what: str) -> GateResult:
    drop = group.accuracy_drop
    threshold = gates.specificity_max_drop
    metric = f"accuracy drop (base - edited) on {what}"
    worst = min(group.subjects, key=lambda s: s.edited_accuracy - s.base_accuracy)
    observed = f"accuracy on {what} {_percent(group.base.accuracy)} -> {_percent(group.edited.accuracy)}"
    if worst.edited_accuracy < worst.base_accuracy:
        observed += (f"; largest drop {worst.subject!r} {_percent(worst.base_accuracy)} -> "
                     f"{_percent(worst.edited_accuracy)}")
    observed += f"; image feature distance {group.feature_distance:.3f}"
    passed = drop <= threshold + 1e-12
    message = observed if passed else f"{observed}: drop {_percent(drop)} exceeds the allowed {_percent(threshold)}"
    return GateResult(name, index, passed, False, metric, drop, "<=", threshold, message)


def evaluate_gates(recipe: Recipe, groups: list[GroupResult]) -> list[GateResult]:
    """Every gate of the recipe, in report order: per edit, then the generic set."""
    by_key = {(g.name, g.edit_index): g for g in groups}
    gates = recipe.verify
    results = []
    for index, edit in enumerate(recipe.edits):
        results.append(efficacy_gate(edit, index, by_key[(EFFICACY, index)], gates))
        results.append(generalization_gate(edit, index, by_key[(GENERALIZATION, index)], gates))
        if (SPECIFICITY, index) in by_key:
            results.append(specificity_gate(f"edits[{index}].specificity", index, by_key[(SPECIFICITY, index)],
                                            gates, f"neighbours of {edit.concept!r}"))
    if (GENERIC, None) in by_key:
        results.append(specificity_gate("generic.specificity", None, by_key[(GENERIC, None)], gates,
                                        "generic object prompts"))
    return results
