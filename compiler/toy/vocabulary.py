"""The toy world's vocabulary, in the schema of ``compiler.prompts`` (the same interface as the
real-world one).

The toy model folder brings it as ``weights/vocabulary.yaml`` beside ``weights/pipeline``, so
every command on a toy-world model speaks the toy's words and nothing outside ``compiler/toy``
reads ``world``. ``python -m compiler.toy.vocabulary`` rewrites the file from ``world`` (the
tests check the two agree); training writes it next to the weights it saves.

The templates are the ones compile and verify used before vocabularies existed: three solve
prefixes ("", "a photo of ", "an image of ") around "{subject} in the style of {concept}" for
styles (every coloured shape), the concept alone and in every style for objects and facts
(with "a picture of " as a fourth prefix), and the world's held-out prefixes for verify.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import yaml

from compiler.toy import WEIGHTS_DIR, world

VOCABULARY_FILE = WEIGHTS_DIR / "vocabulary.yaml"
SOLVE_PREFIXES = ("", "a photo of ", "an image of ")
GENERIC_PREFIXES = ("", "a photo of ", "a picture of ")


def _subject_templates(prefixes) -> list[str]:
    out = []
    for p in prefixes:
        out += [f"{p}{{concept}}", f"{p}{{concept}} in the style of {{style}}"]
    return out


def vocabulary_data() -> dict:
    """The toy vocabulary as the mapping ``compiler.prompts.load_vocabulary`` reads."""
    subjects = [f"a {c} {o}" for o in world.OBJECTS for c in world.COLOURS]
    named = [*world.CHARACTERS, *world.PEOPLE, *world.FACTS]
    pool = [s + (f" in the style of {st}" if st else "") for st in (None, *world.STYLES) for s in subjects]
    # A fixed-seed order: a plain stride would line up with the colour cycle of the pool.
    order = random.Random(0).sample(range(len(pool)), len(pool))
    style_solve = [f"{p}{{subject}} in the style of {{concept}}" for p in SOLVE_PREFIXES]
    style_heldout = [f"{p}{{subject}} in the style of {{concept}}" for p in world.HELDOUT_PREFIXES]
    subject_solve = _subject_templates((*SOLVE_PREFIXES, "a picture of "))
    subject_heldout = _subject_templates(world.HELDOUT_PREFIXES)
    return {
        "name": "toy world",
        "styles": [s for s in world.STYLES if s != "a painting"],
        "objects": [f"a {o}" for o in world.OBJECTS],
        "characters": {name: f"a {generic}" for name, generic in world.CHARACTERS.items()},
        "facts": dict(world.FACTS),
        "people": list(world.PEOPLE),
        # Named concepts first (each keeps its own meaning), then generic scenes in every style.
        "captions": named + [pool[i] for i in order],
        "preserve_captions": 60,
        "subjects": subjects,
        "styles_in_templates": list(world.STYLES),
        "templates": {
            "style": {"solve": style_solve, "heldout": style_heldout},
            "object": {"solve": subject_solve, "heldout": subject_heldout},
            "fact": {"solve": subject_solve, "heldout": subject_heldout},
        },
        "generic_templates": [f"{p}{{subject}}" for p in GENERIC_PREFIXES],
    }


def vocabulary_text() -> str:
    header = ("# The toy world's vocabulary (compiler.prompts schema), written by\n"
              "# `python -m compiler.toy.vocabulary` from compiler/toy/world.py; do not edit by hand.\n")
    return header + yaml.safe_dump(vocabulary_data(), sort_keys=False, width=120, allow_unicode=True)


def write_vocabulary(directory: Path = WEIGHTS_DIR) -> Path:
    path = Path(directory) / "vocabulary.yaml"
    path.write_text(vocabulary_text(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_vocabulary(Path(sys.argv[1]) if len(sys.argv) > 1 else WEIGHTS_DIR))
