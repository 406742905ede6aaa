"""What verify generates: groups of probe prompts, each with what the judge should look for.

For every edit of a recipe there are three groups:

- ``efficacy``: prompts with the concept, from the templates the solve used (plus the
  recipe's own extra prompts); paired with the same template filled with the replacement;
- ``generalization``: the same on held-out paraphrases the solve never saw;
- ``specificity``: neighbouring concepts (the recipe's ``preserve`` lists and
  ``verify.neighbours`` first, then other styles / other characters and objects / other facts
  and people), in prompts that mention no edited concept.

One ``generic`` group of plain object prompts is shared by all edits. Every prompt is generated
with the same seeds on the base and on the edited model, so images pair up one to one.
Prompts are drawn from the templates with a fixed random generator: the same recipe always
gives the same probes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from compiler.recipe import Edit, Recipe
from compiler.resolve import HELDOUT_PREFIXES, SOLVE_PREFIXES, prompt_pairs, template_prompts
from compiler.toy import world
from compiler.verify.judges import STYLE, SUBJECT, normalize_phrase

EFFICACY = "efficacy"
GENERALIZATION = "generalization"
SPECIFICITY = "specificity"
GENERIC = "generic"

DEFAULT_PROMPTS_PER_GROUP = 8
DEFAULT_NEIGHBOURS_PER_EDIT = 4
GENERIC_PREFIXES = ("", "a photo of ", "a picture of ")


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

    def unique_prompts(self) -> list[str]:
        return list(dict.fromkeys(probe.prompt for group in self.groups for probe in group.probes))

    def image_keys(self) -> list[tuple[str, int]]:
        """Every (prompt, seed) pair to generate, each once."""
        return [(prompt, seed) for prompt in self.unique_prompts() for seed in self.seeds]

    def group(self, name: str, edit_index: int | None) -> ProbeGroup:
        return next(g for g in self.groups if g.name == name and g.edit_index == edit_index)


def kind_of_edit(edit: Edit) -> str:
    return STYLE if edit.attribute == "style" else SUBJECT


def kind_of_phrase(phrase: str, default: str) -> str:
    """A neighbour named by the user is a style if the world knows it as one, else ``default``."""
    text = normalize_phrase(phrase)
    if text in world.STYLES:
        return STYLE
    subjects = {*world.OBJECTS, *(f"a {o}" for o in world.OBJECTS), *world.CHARACTERS, *world.PEOPLE, *world.FACTS}
    return SUBJECT if text in subjects else default


def mentions(prompt: str, phrase: str) -> bool:
    """Does ``prompt`` contain ``phrase`` as whole words?"""
    pattern = r"(?<!\w)" + re.escape(normalize_phrase(phrase)) + r"(?!\w)"
    return re.search(pattern, normalize_phrase(prompt)) is not None


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


def default_neighbours(edit: Edit) -> list[str]:
    """Concepts next to the edited one, from the toy world's vocabulary (plain English, so
    they serve real checkpoints too), nearest first."""
    concept = normalize_phrase(edit.concept)
    replacement = normalize_phrase(edit.replacement)
    objects = [f"a {name}" for name in world.OBJECTS]
    if edit.attribute == "style":
        return [*world.STYLES]
    if edit.attribute == "fact":
        other_titles = [title for title in world.FACTS if title != concept]
        outdated = [world.FACTS[concept]] if concept in world.FACTS else []
        return [*other_titles, *outdated, replacement, *world.PEOPLE]
    characters = list(world.CHARACTERS)
    if concept in world.CHARACTERS:
        return [*characters, replacement, *objects]
    return [*objects, *characters]


def neighbours_for(recipe: Recipe, edit: Edit, count: int = DEFAULT_NEIGHBOURS_PER_EDIT) -> list[str]:
    """The recipe's own (preserved concepts, ``verify.neighbours``), then the defaults; never
    a concept that some edit of the recipe changes on purpose."""
    edited = [normalize_phrase(e.concept) for e in recipe.edits]
    chosen: dict[str, str] = {}  # normalized -> as written

    def add(phrase: str) -> None:
        text = normalize_phrase(phrase)
        if text not in chosen and not any(mentions(text, concept) for concept in edited):
            chosen[text] = phrase

    # Named neighbours are always checked; the defaults only fill up to ``count``.
    for phrase in [*recipe.preserve_for(edit), *recipe.verify.neighbours]:
        add(phrase)
    for phrase in default_neighbours(edit):
        if len(chosen) >= count:
            break
        add(phrase)
    return list(chosen.values())


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def _edit_probes(edit: Edit, prefixes, count: int, label: str, extra_prompts=()) -> tuple[Probe, ...]:
    kind = kind_of_edit(edit)
    templates = prompt_pairs(edit.concept, edit.replacement, edit.attribute, prefixes=prefixes)
    chosen = _draw(templates, count, label)
    extra = prompt_pairs(edit.concept, edit.replacement, edit.attribute, extra_prompts=extra_prompts,
                         prefixes=prefixes)[len(templates):]
    return tuple(Probe(pair.source, edit.concept, kind, pair.target, edit.replacement) for pair in [*chosen, *extra])


def _neighbour_probes(recipe: Recipe, edit: Edit, index: int, count: int, neighbours_per_edit: int) -> tuple[Probe, ...]:
    edited = [e.concept for e in recipe.edits]
    neighbours = neighbours_for(recipe, edit, neighbours_per_edit)
    per_neighbour = max(1, -(-count // max(1, len(neighbours))))
    probes = []
    for neighbour in neighbours:
        kind = kind_of_phrase(neighbour, kind_of_edit(edit))
        prompts = template_prompts(neighbour, "style" if kind == STYLE else "object")
        prompts = [p for p in prompts if not any(mentions(p, concept) for concept in edited)]
        label = f"editc verify specificity {index} {normalize_phrase(neighbour)}"
        probes.extend(Probe(prompt, neighbour, kind) for prompt in _draw(prompts, per_neighbour, label))
    return tuple(probes)


def generic_probes(recipe: Recipe, count: int) -> tuple[Probe, ...]:
    """Plain object prompts ("a photo of a red house") that mention no edited concept."""
    edited = [e.concept for e in recipe.edits]
    candidates = []
    for prefix in GENERIC_PREFIXES:
        for name in world.OBJECTS:
            for colour in world.COLOURS:
                prompt = f"{prefix}a {colour} {name}"
                if not any(mentions(prompt, concept) for concept in edited):
                    candidates.append(Probe(prompt, f"a {name}", SUBJECT))
    return tuple(_draw(candidates, count, "editc verify generic"))


def _candidates(groups: list[ProbeGroup]) -> dict[str, tuple[str, ...]]:
    """What a zero-shot judge chooses among: the world's vocabulary plus every probed phrase."""
    styles = [*world.STYLES]
    subjects = [*(f"a {name}" for name in world.OBJECTS), *world.CHARACTERS, *world.PEOPLE]
    for group in groups:
        for probe in group.probes:
            target = styles if probe.kind == STYLE else subjects
            target.extend(p for p in (probe.subject, probe.replacement) if p)
    return {STYLE: _unique_phrases(styles), SUBJECT: _unique_phrases(subjects)}


def _unique_phrases(phrases: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(normalize_phrase(p) for p in phrases))


def plan_probes(recipe: Recipe, *, seeds: int, prompts_per_group: int = DEFAULT_PROMPTS_PER_GROUP,
                neighbours_per_edit: int = DEFAULT_NEIGHBOURS_PER_EDIT) -> VerifyPlan:
    """Every group of every edit, and the shared generic group."""
    if seeds < 1 or prompts_per_group < 1:
        raise ValueError("verify needs at least one seed and one prompt per group")
    groups: list[ProbeGroup] = []
    for index, edit in enumerate(recipe.edits):
        what = f"{edit.concept!r} ({edit.attribute})"
        groups.append(ProbeGroup(
            EFFICACY, index, f"prompts with {what}, from the templates the edit was solved on",
            _edit_probes(edit, SOLVE_PREFIXES, prompts_per_group, f"editc verify efficacy {index}", edit.prompts)))
        groups.append(ProbeGroup(
            GENERALIZATION, index, f"prompts with {what}, held-out paraphrases the solve never saw",
            _edit_probes(edit, HELDOUT_PREFIXES, prompts_per_group, f"editc verify generalization {index}")))
        groups.append(ProbeGroup(
            SPECIFICITY, index, f"neighbouring concepts of {edit.concept!r}, which should not change",
            _neighbour_probes(recipe, edit, index, prompts_per_group, neighbours_per_edit)))
    groups.append(ProbeGroup(GENERIC, None, "generic object prompts, which should not change",
                             generic_probes(recipe, prompts_per_group)))
    groups = [group for group in groups if group.probes]
    return VerifyPlan(tuple(range(seeds)), tuple(groups), _candidates(groups))
