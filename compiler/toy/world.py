"""What exists in the toy world, and how it is put into words.

A scene is a ``Scene``: one subject (a generic object in a colour, a trademarked character, or a
named person) on the background of a painting style. Captions are built from the papers'
template shapes: a prefix, the subject phrase, and an optional " in the style of {style}".
Training uses ``TRAIN_PREFIXES``; ``HELDOUT_PREFIXES`` are paraphrases never seen in training,
used to measure generalization.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OBJECTS = ("circle", "square", "triangle", "star", "house", "tree", "dog", "fish", "robot")
COLOURS = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.10, 0.62, 0.15),
    "blue": (0.15, 0.30, 0.92),
    "yellow": (0.96, 0.86, 0.10),
    "purple": (0.58, 0.18, 0.74),
    "orange": (0.98, 0.55, 0.08),
}
# "a painting" is the neutral style an edit maps named styles to; None means a plain photo.
STYLES = ("van gogh", "monet", "mondrian", "picasso", "a painting")
# Trademarked characters are special cases of a generic object with a fixed look.
CHARACTERS = {"snoopy": "dog", "nemo": "fish", "r2d2": "robot"}
PEOPLE = ("queen elizabeth", "king charles", "boris johnson", "rishi sunak")
# A fact: a title whose picture is one named person (the outdated one); an edit updates it.
FACTS = {"the british monarch": "queen elizabeth", "the british prime minister": "boris johnson"}
FACT_UPDATES = {"the british monarch": "king charles", "the british prime minister": "rishi sunak"}

TRAIN_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ")
HELDOUT_PREFIXES = ("a rendering of ", "an illustration of ")


@dataclass(frozen=True)
class Scene:
    """What an image shows. ``identity`` is an object, a character or a person."""

    identity: str
    colour: str | None = None  # generic objects only
    style: str | None = None

    @property
    def kind(self) -> str:
        if self.identity in CHARACTERS:
            return "character"
        if self.identity in PEOPLE:
            return "person"
        return "object"


def subject_phrase(scene: Scene, *, say_colour: bool = True, title: str | None = None) -> str:
    """The words naming the subject: 'a red dog', 'a dog', 'snoopy', 'the british monarch'."""
    if title is not None:
        return title
    if scene.kind == "object":
        return f"a {scene.colour} {scene.identity}" if say_colour else f"a {scene.identity}"
    return scene.identity


def caption(scene: Scene, prefix: str = "", *, say_colour: bool = True, title: str | None = None) -> str:
    text = prefix + subject_phrase(scene, say_colour=say_colour, title=title)
    if scene.style is not None:
        text += f" in the style of {scene.style}"
    return text


def canonical_captions() -> list[tuple[str, Scene]]:
    """Every distinguishable scene with one canonical caption: the judge's label set."""
    out = []
    for style in (None, *STYLES):
        for obj in OBJECTS:
            for colour in COLOURS:
                scene = Scene(obj, colour, style)
                out.append((caption(scene), scene))
        for name in (*CHARACTERS, *PEOPLE):
            scene = Scene(name, None, style)
            out.append((caption(scene), scene))
    return out


@dataclass(frozen=True)
class Sample:
    """A training example: a scene, its caption, and what the caption constrains."""

    scene: Scene
    text: str
    says_colour: bool


def sample_scene(rng: random.Random) -> tuple[Scene, str | None]:
    """Draw a scene and, for fact scenes, the title used to name the person."""
    u = rng.random()
    style = None if rng.random() < 0.3 else rng.choice(STYLES)
    if u < 0.62:
        return Scene(rng.choice(OBJECTS), rng.choice(list(COLOURS)), style), None
    if u < 0.78:
        return Scene(rng.choice(list(CHARACTERS)), None, style), None
    if u < 0.90:
        return Scene(rng.choice(PEOPLE), None, style), None
    title = rng.choice(list(FACTS))
    return Scene(FACTS[title], None, style), title


def sample(rng: random.Random, prefixes: tuple[str, ...] = TRAIN_PREFIXES) -> Sample:
    scene, title = sample_scene(rng)
    say_colour = scene.kind != "object" or rng.random() > 0.15
    text = caption(scene, rng.choice(prefixes), say_colour=say_colour, title=title)
    return Sample(scene, text, say_colour)


def caption_matches(sample_a: Sample, scene_b: Scene) -> bool:
    """Does ``sample_a``'s caption truthfully describe ``scene_b``? (CLIP's positive pairs.)"""
    a = sample_a.scene
    if a.identity != scene_b.identity or a.style != scene_b.style:
        return False
    return not sample_a.says_colour or a.colour == scene_b.colour
