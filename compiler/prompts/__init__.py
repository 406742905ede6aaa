"""Real-world words: vocabularies, prompt templates and neighbours.

- ``vocabulary``: the schema and loader; the real-world vocabulary ships in ``data/``.
- ``templates``: prompts from a vocabulary's templates (solve, held-out, preservation).
- ``neighbours``: the concepts nearest an edited one in the model's own text space.

Which vocabulary a model gets is decided by the model (:func:`vocabulary_for`): a recipe's
``vocabulary:`` file first, then one the model folder brings (the embedded toy model brings
its own), else the real-world vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from compiler.prompts.neighbours import DEFAULT_NEIGHBOURS, Neighbour, rank_neighbours
from compiler.prompts.templates import (PromptPair, generic_probes, mentions, preserve_captions, prompt_pairs,
                                        template_prompts)
from compiler.prompts.vocabulary import (ATTRIBUTES, Vocabulary, find_model_vocabulary, load_vocabulary,
                                         normalize, real_vocabulary)


def vocabulary_for(model_dir: str | Path | None, recipe_vocabulary: str | Path | None = None) -> Vocabulary:
    """The vocabulary for a model: the recipe's file, else the model folder's, else the real one."""
    if recipe_vocabulary is not None:
        return load_vocabulary(recipe_vocabulary)
    own = find_model_vocabulary(model_dir)
    return load_vocabulary(own) if own is not None else real_vocabulary()


__all__ = [
    "ATTRIBUTES", "DEFAULT_NEIGHBOURS", "Neighbour", "PromptPair", "Vocabulary", "find_model_vocabulary",
    "generic_probes", "load_vocabulary", "mentions", "normalize", "preserve_captions", "prompt_pairs",
    "rank_neighbours", "real_vocabulary", "template_prompts", "vocabulary_for",
]
