"""Prompts from a vocabulary's templates.

An edit "concept -> replacement" becomes prompt pairs: the same template filled once with the
concept and once with the replacement (the papers' shapes: "a house in the style of van
gogh" / "a house in the style of a painting"). Solve templates are what compile solves on;
held-out templates are verify's paraphrases, never solved on.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from compiler.prompts.vocabulary import Vocabulary, normalize


@dataclass(frozen=True)
class PromptPair:
    """One template filled with the concept (``source``) and with the replacement (``target``)."""

    source: str
    target: str


def fill(template: str, concept: str, vocabulary: Vocabulary) -> list[str]:
    """Every prompt a template gives for ``concept``: one per ``subjects`` entry when it has
    ``{subject}``, one per ``styles_in_templates`` entry when it has ``{style}``, else one."""
    if "{subject}" in template:
        return [template.format(concept=concept, subject=s) for s in vocabulary.subjects]
    if "{style}" in template:
        return [template.format(concept=concept, style=s) for s in vocabulary.styles_in_templates]
    return [template.format(concept=concept)]


def template_prompts(vocabulary: Vocabulary, phrase: str, attribute: str, *, heldout: bool = False) -> list[str]:
    """The attribute's solve (or held-out) templates filled with ``phrase``, in order."""
    templates = vocabulary.templates[attribute]
    return [p for t in (templates.heldout if heldout else templates.solve) for p in fill(t, phrase, vocabulary)]


def prompt_pairs(vocabulary: Vocabulary, concept: str, replacement: str, attribute: str, extra_prompts=(),
                 *, heldout: bool = False) -> list[PromptPair]:
    """The templates for the attribute, plus the recipe's own prompts (which contain the
    concept; their target swaps in the replacement)."""
    sources = template_prompts(vocabulary, concept, attribute, heldout=heldout)
    targets = template_prompts(vocabulary, replacement, attribute, heldout=heldout)
    pairs = [PromptPair(s, t) for s, t in zip(sources, targets)]
    for prompt in extra_prompts:
        pairs.append(PromptPair(prompt, replace_last(prompt, concept, replacement)))
    return pairs


def replace_last(text: str, old: str, new: str) -> str:
    i = text.lower().rfind(old.lower())
    return text if i < 0 else text[:i] + new + text[i + len(old):]


def replace_phrase(text: str, old: str, new: str) -> str:
    """``text`` with every whole-word occurrence of ``old`` (any case) replaced by ``new``."""
    pattern = r"(?<!\w)" + re.escape(old) + r"(?!\w)"
    return re.sub(pattern, lambda _: new, text, flags=re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def _whole_words(phrases: frozenset[str]) -> re.Pattern:
    """One pattern matching any of the (normalized) ``phrases`` as whole words."""
    alternatives = sorted((re.escape(p) for p in phrases), key=lambda a: (-len(a), a))
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


def mentions(prompt: str, phrase: str) -> bool:
    """Does ``prompt`` contain ``phrase`` as whole words?"""
    return _whole_words(frozenset((normalize(phrase),))).search(normalize(prompt)) is not None


class PhraseSet:
    """Asks "does this prompt mention any of these phrases (as whole words)?" with one compiled
    pattern: a recipe of 100 concepts filters tens of thousands of prompts against all of them
    (measured: 8 million ``mentions`` calls, 46 s of a 100-concept toy compile, before)."""

    def __init__(self, phrases):
        self.phrases = frozenset(normalize(p) for p in phrases)
        self._pattern = _whole_words(self.phrases) if self.phrases else None

    def mentioned_in(self, prompt: str) -> bool:
        """True when ``prompt`` mentions at least one of the phrases (``any(mentions(prompt, p))``)."""
        return self._pattern is not None and self._pattern.search(normalize(prompt)) is not None


def preserve_captions(vocabulary: Vocabulary, avoid: list[str], count: int | None = None) -> list[str]:
    """The first ``count`` (default: the vocabulary's ``preserve_captions``) generic captions
    that mention none of ``avoid``: UCE-style rows that keep the rest of the language put."""
    count = vocabulary.preserve_captions if count is None else count
    out = []
    avoided = PhraseSet(avoid)
    for caption in vocabulary.captions:
        if len(out) >= count:
            break
        if not avoided.mentioned_in(caption):
            out.append(caption)
    return out


def generic_probes(vocabulary: Vocabulary) -> list[tuple[str, str]]:
    """(prompt, subject) for verify's generic group: every object (or, for a template with
    ``{subject}``, every subject) in every generic template."""
    out = []
    for template in vocabulary.generic_templates:
        if "{subject}" in template:
            out.extend((template.format(subject=s), s) for s in vocabulary.subjects)
        else:
            out.extend((template.format(concept=obj), obj) for obj in vocabulary.objects)
    return out
