"""Neighbours found, not listed: the vocabulary's concepts nearest the edited one in the model's
own text-encoder space.

UCE, MACE and RECE make the user list what to preserve. Here, for each edit, every concept of
the vocabulary with the same attribute is put into the attribute's first solve templates, the
state the edit moves is read at its last subject token (the text encoder's output for a UNet
K/V edit, the layer-0 attention's input for Diff-QuickFix), and the concepts are ranked by
cosine similarity to the edited concept's state (averaged over the templates). The nearest k
are the ones most at risk: compile keeps them put (preservation rows) and verify checks them
(specificity probes).
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compiler.prompts.templates import fill, mentions
from compiler.prompts.vocabulary import Vocabulary, normalize

DEFAULT_NEIGHBOURS = 8
PROBE_TEMPLATES = 2  # solve templates per concept used to place it in the model's space

# encode(prompts, phrases) -> (N, d): the state at each prompt's last token of its phrase.
StateEncoder = Callable[[list[str], list[str]], torch.Tensor]


@dataclass(frozen=True)
class Neighbour:
    phrase: str
    similarity: float

    def to_dict(self) -> dict:
        return {"concept": self.phrase, "similarity": round(self.similarity, 4)}


def probe_prompts(vocabulary: Vocabulary, phrase: str, attribute: str) -> list[str]:
    """The first fill of each of the attribute's first solve templates, with ``phrase``."""
    templates = vocabulary.templates[attribute].solve[:PROBE_TEMPLATES]
    return [fill(t, phrase, vocabulary)[0] for t in templates]


def candidates(vocabulary: Vocabulary, concept: str, attribute: str, avoid: Sequence[str] = ()) -> list[str]:
    """The attribute's concepts, less the edited concept, anything in ``avoid`` (replacements,
    other edited concepts) and any phrase that contains one of them or is contained in one
    (preserving "vincent van gogh" would fight an edit of "van gogh")."""
    blocked, own = _blocked(tuple(avoid)), _blocked((concept,))
    out = [phrase for phrase in vocabulary.concepts(attribute)
           if not own.touches(phrase) and not blocked.touches(phrase)]
    return list(dict.fromkeys(out))


_WORD = re.compile(r"\w+")


class _Blocked:
    r"""Phrases that a candidate may not equal, contain or be contained in (whole words).

    A whole-word occurrence of ``b`` in ``p`` makes every ``\w+`` run of ``b`` a run of ``p``,
    so only the blocked phrases sharing a word with a candidate are tested (exactly, with
    :func:`mentions`): a recipe of 1,000 concepts checks each candidate against a few phrases,
    not against 2,000 (it was quadratic in the recipe's size)."""

    def __init__(self, phrases: Sequence[str]):
        self.exact = {normalize(p) for p in phrases}
        self.words = {b: frozenset(_WORD.findall(b)) for b in self.exact}
        self.by_word: dict[str, list[str]] = defaultdict(list)
        for b, words in self.words.items():
            for word in words:
                self.by_word[word].append(b)
        self.wordless = [b for b, words in self.words.items() if not words]

    def touches(self, phrase: str) -> bool:
        p = normalize(phrase)
        if p in self.exact:
            return True
        words = frozenset(_WORD.findall(p))
        if not words:  # no words to index by: test every blocked phrase
            return any(mentions(p, b) or mentions(b, p) for b in self.exact)
        tested = set()
        for b in (*(b for w in words for b in self.by_word.get(w, ())), *self.wordless):
            if b in tested:
                continue
            tested.add(b)
            if (self.words[b] <= words and mentions(p, b)) or (words <= self.words[b] and mentions(b, p)):
                return True
        return False


@functools.lru_cache(maxsize=16)
def _blocked(phrases: tuple[str, ...]) -> _Blocked:
    return _Blocked(phrases)


@torch.no_grad()
def rank_neighbours(vocabulary: Vocabulary, concept: str, attribute: str, encode: StateEncoder, *,
                    k: int = DEFAULT_NEIGHBOURS, avoid: Sequence[str] = ()) -> list[Neighbour]:
    """The ``k`` concepts nearest ``concept`` (cosine of mean last-subject-token states),
    nearest first; ties broken by the vocabulary's order, so the ranking is deterministic."""
    if k <= 0:
        return []
    pool = candidates(vocabulary, concept, attribute, avoid)
    if not pool:
        return []
    phrases = [concept, *pool]
    prompts, owners = [], []
    for phrase in phrases:
        for prompt in probe_prompts(vocabulary, phrase, attribute):
            prompts.append(prompt)
            owners.append(phrase)
    states = encode(prompts, owners).double()
    per = len(prompts) // len(phrases)
    states = states.reshape(len(phrases), per, -1)
    states = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    means = states.mean(dim=1)
    means = means / means.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = (means[1:] @ means[0]).tolist()
    order = sorted(range(len(pool)), key=lambda i: (-round(similarity[i], 9), i))
    return [Neighbour(pool[i], float(similarity[i])) for i in order[:k]]
