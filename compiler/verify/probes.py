"""What verify generates: groups of probe prompts, each with what the judge should look for.

For every edit of a recipe there are three groups:

- ``efficacy``: prompts with the concept, from the templates the solve used (plus the
  recipe's own extra prompts); paired with the same template filled with the replacement;
- ``generalization``: the same on held-out paraphrases the solve never saw;
- ``specificity``: neighbouring concepts (the recipe's ``preserve`` lists and
  ``verify.neighbours`` first, then the concepts compile found nearest the edited one in the
  model's own text space, ``compiler.prompts.neighbours``), in held-out prompts (compile keeps
  the neighbours put on the solve templates, so those would grade it on its own rows) that
  mention no edited concept, ``NEIGHBOUR_PROMPTS`` per neighbour (half the prompts per group
  when fewer than the default 8 are asked for).

One ``generic`` group of plain object prompts is shared by all edits. Every word comes from the
model's vocabulary (``compiler.prompts``). Every prompt is generated
with the same seeds on the base and on the edited model, so images pair up one to one.
Prompts are drawn from the templates with a fixed random generator: the same recipe always
gives the same probes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from compiler.judges import STYLE, SUBJECT, normalize_phrase
from compiler.prompts import Vocabulary, generic_probes as vocabulary_generic_probes
from compiler.prompts import mentions as _mentions
from compiler.prompts.templates import PhraseSet
from compiler.recipe import Edit, Recipe
from compiler.resolve import prompt_pairs, template_prompts

EFFICACY = "efficacy"
GENERALIZATION = "generalization"
SPECIFICITY = "specificity"
GENERIC = "generic"

DEFAULT_PROMPTS_PER_GROUP = 8
DEFAULT_NEIGHBOURS_PER_EDIT = None  # None: the recipe's ``neighbours`` (what compile kept put)
# Held-out prompts per neighbour, at least. With one (8 prompts for 8 neighbours), 1-3 label
# flips of 32 images decided the 5-point gate on the toy world although the images barely moved
# (README "Found neighbours vs today's defaults").
NEIGHBOUR_PROMPTS = 4


@dataclass(frozen=True)
class Probe:
    """One prompt, generated with every seed, and what its images should show.

    ``subject`` is the phrase whose presence the judge measures, as a ``kind`` (style or
    subject). In the edit groups, ``target_prompt`` is the same template filled with the
    ``replacement``.
    """

    prompt: str
    subject: str
    kind: str
    target_prompt: str | None = None
    replacement: str | None = None


@dataclass(frozen=True)
class ProbeGroup:
    name: str  # efficacy | generalization | specificity | generic
    edit_index: int | None  # None for the shared generic group
    description: str
    probes: tuple[Probe, ...]

    @property
    def key(self) -> str:
        """The group's name in reports: ``edits[0].efficacy``, ``generic``."""
        return self.name if self.edit_index is None else f"edits[{self.edit_index}].{self.name}"


@dataclass(frozen=True)
class VerifyPlan:
    seeds: tuple[int, ...]
    groups: tuple[ProbeGroup, ...]
    candidates: dict[str, tuple[str, ...]]  # per kind: the phrases a zero-shot judge chooses among
    neighbours: dict[int, tuple[tuple[str, float | None], ...]] = None  # per edit: (phrase, similarity)

    def unique_prompts(self) -> list[str]:
        return list(dict.fromkeys(probe.prompt for group in self.groups for probe in group.probes))

    def image_keys(self) -> list[tuple[str, int]]:
        """Every (prompt, seed) pair to generate, each once."""
        return [(prompt, seed) for prompt in self.unique_prompts() for seed in self.seeds]

    def group(self, name: str, edit_index: int | None) -> ProbeGroup:
        return next(g for g in self.groups if g.name == name and g.edit_index == edit_index)


def kind_of_edit(edit: Edit) -> str:
    return STYLE if edit.attribute == "style" else SUBJECT


def kind_of_phrase(phrase: str, default: str, vocabulary: Vocabulary) -> str:
    """A neighbour is a style if the vocabulary knows it as one, else ``default``."""
    known = vocabulary.attribute_of(phrase)
    if known == "style":
        return STYLE
    return SUBJECT if known is not None else default


def mentions(prompt: str, phrase: str) -> bool:
    """Does ``prompt`` contain ``phrase`` as whole words?"""
    return _mentions(prompt, phrase)


def _draw(items: list, count: int, label: str) -> list:
    """``count`` items drawn without replacement by a generator seeded with ``label``, in their
    original order (so every run of the same recipe draws the same prompts)."""
    if len(items) <= count:
        return list(items)
    chosen = sorted(random.Random(label).sample(range(len(items)), count))
    return [items[i] for i in chosen]


# --------------------------------------------------------------------------------------------
# Neighbours
# --------------------------------------------------------------------------------------------


def neighbours_for(recipe: Recipe, edit: Edit, found=(), count: int | None = None) -> list[str]:
    """The recipe's own (preserved concepts, ``verify.neighbours``), then the ``found`` ones
    (nearest first) up to ``count`` in all; never a concept that some edit of the recipe
    changes on purpose."""
    count = recipe.neighbours if count is None else count
    edited = [normalize_phrase(e.concept) for e in recipe.edits]
    chosen: dict[str, str] = {}  # normalized -> as written

    def add(phrase: str) -> None:
        text = normalize_phrase(phrase)
        if text not in chosen and not any(mentions(text, concept) for concept in edited):
            chosen[text] = phrase

    # Named neighbours are always checked; the found ones only fill up to ``count``.
    for phrase in [*recipe.preserve_for(edit), *recipe.verify.neighbours]:
        add(phrase)
    for phrase in found:
        if len(chosen) >= count:
            break
        add(phrase)
    return list(chosen.values())


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def _edit_probes(edit: Edit, vocabulary: Vocabulary, heldout: bool, count: int, label: str,
                 extra_prompts=()) -> tuple[Probe, ...]:
    kind = kind_of_edit(edit)
    templates = prompt_pairs(edit.concept, edit.replacement, edit.attribute, vocabulary=vocabulary, heldout=heldout)
    chosen = _draw(templates, count, label)
    extra = prompt_pairs(edit.concept, edit.replacement, edit.attribute, extra_prompts=extra_prompts,
                         vocabulary=vocabulary, templates=False)
    return tuple(Probe(pair.source, edit.concept, kind, pair.target, edit.replacement) for pair in [*chosen, *extra])


def _neighbour_probes(recipe: Recipe, edit: Edit, index: int, count: int, neighbours: list[str],
                      vocabulary: Vocabulary) -> tuple[Probe, ...]:
    edited = PhraseSet(e.concept for e in recipe.edits)
    # ``count`` prompts at least; ``NEIGHBOUR_PROMPTS`` per neighbour at the default 8 prompts
    # per group, half of ``count`` when fewer are asked for (quick runs), one at least.
    per_neighbour = max(1, min(NEIGHBOUR_PROMPTS, count // 2), -(-count // max(1, len(neighbours))))
    probes = []
    for neighbour in neighbours:
        kind = kind_of_phrase(neighbour, kind_of_edit(edit), vocabulary)
        attribute = "style" if kind == STYLE else (edit.attribute if edit.attribute != "style" else "object")
        prompts = template_prompts(neighbour, attribute, vocabulary, heldout=True)
        prompts = [p for p in prompts if not edited.mentioned_in(p)]
        label = f"editc verify specificity {index} {normalize_phrase(neighbour)}"
        probes.extend(Probe(prompt, neighbour, kind) for prompt in _draw(prompts, per_neighbour, label))
    return tuple(probes)


def generic_probes(recipe: Recipe, count: int, vocabulary: Vocabulary) -> tuple[Probe, ...]:
    """Plain object prompts ("a photo of a red house") that mention no edited concept."""
    edited = PhraseSet(e.concept for e in recipe.edits)
    candidates = [Probe(prompt, subject, SUBJECT) for prompt, subject in vocabulary_generic_probes(vocabulary)
                  if not edited.mentioned_in(prompt)]
    return tuple(_draw(candidates, count, "editc verify generic"))


def _candidates(groups: list[ProbeGroup], vocabulary: Vocabulary) -> dict[str, tuple[str, ...]]:
    """What a zero-shot judge chooses among: the vocabulary plus every probed phrase."""
    styles = [*vocabulary.styles]
    people = [person for _, person in vocabulary.facts] + list(vocabulary.people)
    subjects = [*vocabulary.objects, *(name for name, _ in vocabulary.characters), *people]
    for group in groups:
        for probe in group.probes:
            target = styles if probe.kind == STYLE else subjects
            target.extend(p for p in (probe.subject, probe.replacement) if p)
    return {STYLE: _unique_phrases(styles), SUBJECT: _unique_phrases(subjects)}


def _unique_phrases(phrases: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(normalize_phrase(p) for p in phrases))


def plan_probes(recipe: Recipe, *, seeds: int, vocabulary: Vocabulary, found: dict | None = None,
                prompts_per_group: int = DEFAULT_PROMPTS_PER_GROUP,
                neighbours_per_edit: int | None = DEFAULT_NEIGHBOURS_PER_EDIT) -> VerifyPlan:
    """Every group of every edit, and the shared generic group.

    ``found``: per edit index, the neighbours compile found (``(phrase, similarity)``, nearest
    first); ``neighbours_per_edit`` caps named + found ones (default: the recipe's
    ``neighbours``)."""
    if seeds < 1 or prompts_per_group < 1:
        raise ValueError("verify needs at least one seed and one prompt per group")
    found = found or {}
    groups: list[ProbeGroup] = []
    checked: dict[int, tuple[tuple[str, float | None], ...]] = {}
    for index, edit in enumerate(recipe.edits):
        what = f"{edit.concept!r} ({edit.attribute})"
        similarity = {normalize_phrase(p): sim for p, sim in found.get(index, ())}
        neighbours = neighbours_for(recipe, edit, [p for p, _ in found.get(index, ())], neighbours_per_edit)
        checked[index] = tuple((n, similarity.get(normalize_phrase(n))) for n in neighbours)
        named = ", ".join(n if s is None else f"{n} ({s:.2f})" for n, s in checked[index])
        groups.append(ProbeGroup(
            EFFICACY, index, f"prompts with {what}, from the templates the edit was solved on",
            _edit_probes(edit, vocabulary, False, prompts_per_group, f"editc verify efficacy {index}", edit.prompts)))
        groups.append(ProbeGroup(
            GENERALIZATION, index, f"prompts with {what}, held-out paraphrases the solve never saw",
            _edit_probes(edit, vocabulary, True, prompts_per_group, f"editc verify generalization {index}")))
        groups.append(ProbeGroup(
            SPECIFICITY, index, f"neighbouring concepts of {edit.concept!r}, which should not change: {named}",
            _neighbour_probes(recipe, edit, index, prompts_per_group, neighbours, vocabulary)))
    groups.append(ProbeGroup(GENERIC, None, "generic object prompts, which should not change",
                             generic_probes(recipe, prompts_per_group, vocabulary)))
    groups = [group for group in groups if group.probes]
    return VerifyPlan(tuple(range(seeds)), tuple(groups), _candidates(groups, vocabulary), checked)
