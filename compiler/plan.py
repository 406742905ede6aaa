"""Plan: for every edit of a recipe, its method (and site), its layers and its prompt pairs, and
why each was chosen. Method policy lives in the method plug-ins (:mod:`compiler.methods`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from compiler import resolve
from compiler.errors import UserError
from compiler.methods import AUTO_PREFERENCE, EditMethod, get_method
from compiler.models.families import FAMILIES, known_location
from compiler.recipe import Edit, Recipe

NAMED_PRESERVE_PROMPTS = 24  # template prompts per concept named in ``preserve``


class LayersSource(str, enum.Enum):
    """Where an edit's UNet layers came from."""

    RECIPE = "recipe"
    FAMILY_DEFAULT = "family default"  # the papers' table, at reference widths only
    LOCATE = "locate"  # LocoGen, cached
    ALL_LAYERS = "all layers"  # LocoGen found or confirmed no window: every layer, as UCE does
    NOT_APPLICABLE = "n/a"  # a text-encoder method

    def __str__(self) -> str:
        return self.value


@dataclass
class PlannedEdit:
    """An edit after resolve: its method, layers and prompt pairs, and why."""

    edit: Edit
    method: str
    method_reason: str
    layers: tuple[int, ...]
    layers_source: LayersSource
    pairs: list[resolve.PromptPair]
    lam: float
    site: str | None = None  # where the method edits when it has several places (quickfix)
    eos: bool = True  # remap EOS (and, for UNet methods, padding) rows too
    layers_reason: str = ""  # the detail behind ``layers_source``
    neighbours: list = field(default_factory=list)  # compiler.prompts.Neighbour, nearest first

    @property
    def method_plugin(self) -> EditMethod:
        return get_method(self.method)


def choose_method(edit: Edit, family: str) -> tuple[str, str | None, str]:
    """(method, site or None, why). ``method: auto`` asks the plug-ins in ``AUTO_PREFERENCE``."""
    reason = FAMILIES[family].no_edit_reason
    if reason:
        raise UserError(
            f"edit '{edit.concept}': {reason}; no method applies"
            + (f", not even the recipe's {edit.method}" if edit.method != "auto" else "")
        )
    if edit.method != "auto":
        method = get_method(edit.method)
        return edit.method, method.site(edit), "set in the recipe"
    for name in AUTO_PREFERENCE:
        choice = get_method(name).auto_choice(edit, FAMILIES[family])
        if choice is not None:
            return name, choice.site, choice.reason
    raise UserError(f"edit '{edit.concept}': no method applies to {FAMILIES[family].title}; "
                    "name one in the recipe's method")


def plan_edits(recipe: Recipe, model, locate_fn=None) -> list[PlannedEdit]:
    """Pick method, layers, prompts and neighbours for every edit.

    Layers come from the recipe, else the family's known location (the papers' table, only for
    checkpoints at the reference widths), else LocoGen (``locate_fn``, cached). Prompts come
    from the model's vocabulary; neighbours are the vocabulary's concepts nearest each edited
    one in the model's own text space (``recipe.neighbours`` of them).
    """
    plans = []
    vocabulary = resolve.vocabulary_of(model, recipe.vocabulary)
    n_layers = len(model.registry.cross_attention)
    for i, edit in enumerate(recipe.edits):
        resolve.check_special_tokens(model.tokenizer_for(), edit, f"{recipe.path}: edits[{i}]")
        method, site, reason = choose_method(edit, model.family)
        plugin = get_method(method)
        pairs = resolve.prompt_pairs(edit.concept, edit.replacement, edit.attribute, edit.prompts,
                                     vocabulary=vocabulary)
        resolve.check_prompt_lengths(model.tokenizer_for(), pairs, edit.concept)  # before locating
        layers: tuple[int, ...] = ()
        source, why = LayersSource.NOT_APPLICABLE, ""
        if plugin.edits_unet_layers:
            layers, source, why = _layers_for(edit, model, locate_fn)
            bad = [j for j in layers if j >= n_layers]
            if bad:
                raise UserError(
                    f"{recipe.path}: edits[{i}].layers: {bad} out of range; this model has "
                    f"{n_layers} cross-attention layers (0..{n_layers - 1})"
                )
        lam = recipe.lambda_for(edit)
        eos = edit.eos if edit.eos is not None else plugin.default_eos(site)
        neighbours = find_neighbours(recipe, edit, model, vocabulary, method)
        plans.append(PlannedEdit(edit, method, reason, tuple(layers), source, pairs, lam, site, eos, why,
                                 neighbours))
    compose_targets(plans)
    return plans


def compose_targets(plans: list[PlannedEdit]) -> None:
    """In a recipe of several edits, every target prompt says what the edited model should see:
    each *other* edited concept it names is replaced by that edit's replacement too ("a rendering
    of snoopy in the style of van gogh" → "a rendering of a dog in the style of a painting" when
    both are edited). Left as "… in the style of van gogh", snoopy's rows — and the replacement
    prompts held in place — would ask the one solve to keep the very concept another edit
    removes (measured on the toy, K/V gap left of van gogh: 0.14 alone, 0.32 beside snoopy
    before this rule; bench/many_concepts.py). A single edit's pairs are unchanged."""
    from compiler.prompts.templates import mentions, replace_phrase

    import os

    if len(plans) < 2 or os.environ.get("EDITC_COMPOSE_TARGETS", "1") == "0":  # =0: the measurement's "before"
        return
    from compiler.prompts.templates import PhraseSet

    every_concept = PhraseSet(p.edit.concept for p in plans)
    for plan in plans:
        others = [(p.edit.concept, p.edit.replacement) for p in plans
                  if p is not plan and p.edit.concept.lower() != plan.edit.concept.lower()]
        composed = []
        for pair in plan.pairs:
            target = pair.target
            if not every_concept.mentioned_in(target):  # names no edited concept: nothing to compose
                composed.append(pair)
                continue
            for concept, replacement in others:
                if mentions(target, concept):
                    target = replace_phrase(target, concept, replacement)
            composed.append(pair if target == pair.target else resolve.PromptPair(pair.source, target))
        plan.pairs = composed


def find_neighbours(recipe: Recipe, edit: Edit, model, vocabulary, method: str) -> list:
    """The edit's nearest concepts in the state its method moves (the method's
    ``capture_point``: the text encoder's output unless it says otherwise). Edited concepts and
    replacements are never neighbours."""
    if recipe.neighbours <= 0:
        return []
    capture, capture_name = get_method(method).capture_point(model) or (None, "")
    avoid = [e.concept for e in recipe.edits] + [e.replacement for e in recipe.edits]
    return resolve.find_neighbours(model, vocabulary, edit.concept, edit.attribute,
                                   k=recipe.neighbours, avoid=avoid, capture=capture, capture_name=capture_name)


def _layers_for(edit: Edit, model, locate_fn) -> tuple[tuple[int, ...], LayersSource, str]:
    if isinstance(edit.layers, tuple):
        return edit.layers, LayersSource.RECIPE, "set in the recipe"
    known = None
    if model.registry.matches_reference_widths:  # the papers' table holds at reference widths only
        known = known_location(model.family, edit.attribute)
    if known is not None and edit.layers in ("auto", "default", None):
        return tuple(known.layers), LayersSource.FAMILY_DEFAULT, "the papers' table"
    if edit.layers == "default":
        raise UserError(
            f"edit '{edit.concept}': no known default location for this {model.family} checkpoint "
            "(its widths differ from the papers' models); use layers: auto to run LocoGen"
        )
    if locate_fn is None:
        raise UserError(f"edit '{edit.concept}': no known location and locate is unavailable; set layers: [..]")
    result = locate_fn(edit)
    confirmation = getattr(result, "confirmation", None)
    if not result.passed:
        # No small window holds the concept on this model (the toy world spreads its knowledge
        # over most of the UNet).
        reason = f"LocoGen found no window of <= {result.best_size} layers that removes the concept"
    elif confirmation is not None and not confirmation.best.passed:
        # The sweep's cheap settings found a window that the full-settings run does not confirm:
        # trusting it would edit too little.
        reason = f"LocoGen's window {list(result.layers)} was not confirmed at {confirmation.steps} steps"
    else:
        return tuple(result.layers), LayersSource.LOCATE, "LocoGen"
    # Edit every cross-attention layer, as UCE does, and say why.
    return tuple(range(len(model.registry.cross_attention))), LayersSource.ALL_LAYERS, reason


@dataclass(frozen=True)
class PreserveGroup:
    """Preservation prompts that share one weight in the solve. Each group's ``PᵀP`` is cached
    on its own (``compiler.preserve_cache``), so the generic captions, the same for every recipe
    on a model, are embedded once per model."""

    name: str  # "at risk" | "replacements" | "captions"
    prompts: tuple[str, ...]
    weight: float = 1.0


def preservation_groups(recipe: Recipe, plans: list[PlannedEdit], vocabulary=None) -> list[PreserveGroup]:
    """What the solve keeps in place, in three groups (a prompt belongs to the first that
    names it):

    - ``at risk``: the concepts nearest the edited ones — the recipe's ``preserve`` names and
      every edit's found neighbours — each in its attribute's templates, weighted
      ``recipe.neighbour_weight``: they are what a closed-form edit moves most;
    - ``replacements``: the replacements' own prompts ("a painting" still looks like one);
    - ``captions``: the vocabulary's generic captions.

    No prompt mentions an edited concept."""
    from compiler.prompts.templates import PhraseSet

    vocabulary = vocabulary or resolve.vocabulary_of(None, recipe.vocabulary)
    edited = [p.edit.concept for p in plans]
    names_edited = PhraseSet(edited)
    avoid = edited + [p.edit.replacement for p in plans]
    named = set(recipe.preserve)
    for plan in plans:
        named.update(plan.edit.preserve)
    attributes = sorted({p.edit.attribute for p in plans})
    # A named concept in its own attribute's templates when the vocabulary knows it ("nemo in
    # the style of …" held 8× would only take room from the edits of a many-concept recipe);
    # else in every edited attribute's.
    kept = [(name, attribute) for name in sorted(named)
            for attribute in ([vocabulary.attribute_of(name)] if vocabulary.attribute_of(name) in attributes
                              else attributes)]
    kept += [(n.phrase, plan.edit.attribute) for plan in plans for n in plan.neighbours]
    at_risk = []
    for name, attribute in kept:
        named_prompts = resolve.template_prompts(name, attribute, vocabulary)
        named_prompts = [p for p in named_prompts if not names_edited.mentioned_in(p)]
        at_risk.extend(named_prompts[:: max(1, len(named_prompts) // NAMED_PRESERVE_PROMPTS)])
    replacements = [pair.target for plan in plans for pair in plan.pairs
                    if not names_edited.mentioned_in(pair.target)]
    captions = resolve.default_preserve_prompts(avoid, vocabulary)
    groups, seen = [], set()
    for name, prompts, weight in (("at risk", at_risk, recipe.neighbour_weight),
                                  ("replacements", replacements, 1.0), ("captions", captions, 1.0)):
        prompts = tuple(p for p in dict.fromkeys(prompts) if p not in seen)
        seen.update(prompts)
        if prompts:
            groups.append(PreserveGroup(name, prompts, float(weight)))
    return groups


def preserve_prompts_for(recipe: Recipe, plans: list[PlannedEdit], vocabulary=None) -> list[str]:
    """Every preservation prompt (see :func:`preservation_groups`), each once."""
    return [p for group in preservation_groups(recipe, plans, vocabulary) for p in group.prompts]
