"""A vocabulary: the concepts, templates and generic captions editc's prompts are made of.

A model speaks the language it was trained on. Real checkpoints (SD-1.x, SD-2.x, SD-XL) get
the real-world vocabulary shipped in ``compiler/prompts/data/real.yaml``; a model folder may
bring its own (``vocabulary.yaml`` inside it or beside it, as the embedded toy model does);
a recipe may name one (``vocabulary: FILE``). All of them have the one schema read here.

Schema (YAML or TOML; every list may be inline or ``{file: NAME}``, a text file beside the
vocabulary with one entry per line and ``#`` comments):

- ``name``: what the vocabulary is called (reports say it).
- ``styles``: artists and art styles (attribute ``style``).
- ``objects``: objects and scenes, with their article ("a dog"), attribute ``object``.
- ``characters``: ``name | generic thing`` lines or a mapping: characters and trademarks,
  attribute ``object``; the generic thing is what the character is a special case of.
- ``facts``: ``title | person`` lines or a mapping: titles whose picture is one person
  (attribute ``fact``); ``people``: more public figures.
- ``captions``: generic captions naming no concept, preservation rows in priority order;
  ``preserve_captions``: how many of them a compile uses.
- ``subjects``: what style templates paint; ``styles_in_templates``: what object and fact
  templates with ``{style}`` are drawn in.
- ``templates``: per attribute (``style``, ``object``, ``fact``) ``solve`` and ``heldout``
  lists; each template has ``{concept}``, style templates also ``{subject}``, others may have
  ``{style}``. Held-out templates must differ from the solve templates.
- ``generic_templates``: verify's generic probes, each filled with every object
  (``{concept}``) or every subject (``{subject}``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import UserError

ATTRIBUTES = ("style", "object", "fact")
DATA_DIR = Path(__file__).resolve().parent / "data"
REAL_VOCABULARY = DATA_DIR / "real.yaml"
FILE_NAMES = ("vocabulary.yaml", "vocabulary.yml", "vocabulary.toml")

_LIST_FIELDS = ("styles", "objects", "people", "captions", "subjects", "styles_in_templates",
                "generic_templates")
_PAIR_FIELDS = ("characters", "facts")
_KEYS = ("name", *_LIST_FIELDS, *_PAIR_FIELDS, "preserve_captions", "templates")
_SLOTS = {"style": ("concept", "subject"), "object": ("concept", "style"), "fact": ("concept", "style")}


@dataclass(frozen=True)
class Templates:
    """An attribute's templates: ``solve`` (compile and verify's efficacy) and ``heldout``
    (verify's generalization; disjoint from ``solve``)."""

    solve: tuple[str, ...]
    heldout: tuple[str, ...]


@dataclass(frozen=True)
class Vocabulary:
    """The words of one world (see the module docstring for what each field means)."""

    name: str
    styles: tuple[str, ...]
    objects: tuple[str, ...]
    characters: tuple[tuple[str, str], ...]
    facts: tuple[tuple[str, str], ...]
    people: tuple[str, ...]
    captions: tuple[str, ...]
    preserve_captions: int
    subjects: tuple[str, ...]
    styles_in_templates: tuple[str, ...]
    templates: dict[str, Templates]
    generic_templates: tuple[str, ...]
    source: str = ""
    _kinds: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def concepts(self, attribute: str) -> tuple[str, ...]:
        """The concepts a neighbour of an ``attribute`` edit is drawn from."""
        if attribute == "style":
            return self.styles
        if attribute == "object":
            return (*self.objects, *(name for name, _ in self.characters))
        if attribute == "fact":
            people = dict.fromkeys((*(person for _, person in self.facts), *self.people))
            return (*(title for title, _ in self.facts), *people)
        raise ValueError(f"unknown attribute {attribute!r}")

    def attribute_of(self, phrase: str) -> str | None:
        """``style``, ``object`` or ``fact`` for a phrase this vocabulary knows, else None."""
        if not self._kinds:
            for attribute in ("fact", "object", "style"):  # later wins: a style name stays a style
                for concept in self.concepts(attribute):
                    self._kinds[normalize(concept)] = attribute
        return self._kinds.get(normalize(phrase))

    @property
    def people_of_facts(self) -> dict[str, str]:
        return {normalize(title): person for title, person in self.facts}

    @property
    def generic_of_characters(self) -> dict[str, str]:
        return {normalize(name): generic for name, generic in self.characters}


def normalize(phrase: str) -> str:
    """How phrases are compared: lower case, whitespace collapsed (CLIP lower-cases)."""
    return " ".join(phrase.split()).casefold()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_CACHE: dict[tuple[str, float], Vocabulary] = {}


def real_vocabulary() -> Vocabulary:
    """The real-world vocabulary shipped with editc."""
    return load_vocabulary(REAL_VOCABULARY)


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Read and check a vocabulary file (YAML or TOML); bad input is a ``UserError`` that
    names the file and the field."""
    path = Path(path)
    try:
        stamp = path.stat().st_mtime
    except OSError:
        raise UserError(f"{path}: no such vocabulary file") from None
    key = (str(path.resolve()), stamp)
    if key not in _CACHE:
        _CACHE[key] = _parse(path)
    return _CACHE[key]


def find_model_vocabulary(model_dir: str | Path | None) -> Path | None:
    """A vocabulary a model folder brings: ``vocabulary.yaml`` inside it, or beside it (the
    toy-world layout: ``weights/pipeline`` next to ``weights/vocabulary.yaml``)."""
    if model_dir is None:
        return None
    folder = Path(model_dir)
    if not folder.is_dir():
        return None
    for directory in (folder, folder.resolve().parent):
        for name in FILE_NAMES:
            if (directory / name).is_file():
                return directory / name
    return None


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the vocabulary ({err})") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the user's file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} ({first})") from None


def _parse(path: Path) -> Vocabulary:
    data = _read(path)

    def fail(field_path: str, message: str) -> UserError:
        return UserError(f"{path}: {field_path}: {message}")

    if not isinstance(data, dict):
        raise UserError(f"{path}: a vocabulary must be a mapping with keys {', '.join(_KEYS)}")
    for key in data:
        if key not in _KEYS:
            raise fail(str(key), f"unknown field; valid fields: {', '.join(_KEYS)}")
    for key in ("name", "styles", "objects", "captions", "templates"):
        if key not in data:
            raise fail(key, "missing (required)")

    def lines_of(value: Any, field_path: str) -> list[str]:
        if isinstance(value, dict) and set(value) == {"file"}:
            name = value["file"]
            if not isinstance(name, str) or not name:
                raise fail(f"{field_path}.file", "must be a file name")
            source = path.parent / name
            try:
                text = source.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                raise fail(f"{field_path}.file", f"cannot read {source}") from None
            return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not isinstance(value, list):
            raise fail(field_path, "must be a list of strings or {file: NAME}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise fail(f"{field_path}[{i}]", f"must be a non-empty string, got {item!r}")
            out.append(item.strip())
        return out

    def phrases(key: str, required: bool = False) -> tuple[str, ...]:
        if key not in data:
            return ()
        items = [normalize(x) for x in lines_of(data[key], key)]
        if required and not items:
            raise fail(key, "must not be empty")
        return tuple(dict.fromkeys(items))

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        if key not in data:
            return ()
        value = data[key]
        if isinstance(value, dict) and set(value) != {"file"}:
            items = []
            for name, other in value.items():
                if not isinstance(other, str) or not other.strip():
                    raise fail(f"{key}.{name}", "must be a non-empty string")
                items.append(f"{name} | {other}")
        else:
            items = lines_of(value, key)
        out = []
        for i, line in enumerate(items):
            parts = [p.strip() for p in line.split("|")]
            if len(parts) != 2 or not all(parts):
                raise fail(f"{key}[{i}]", f"must be 'name | {'person' if key == 'facts' else 'generic thing'}', got {line!r}")
            out.append((normalize(parts[0]), normalize(parts[1])))
        return tuple(out)

    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise fail("name", "must be a non-empty string")
    count = data.get("preserve_captions", 60)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise fail("preserve_captions", f"must be an integer >= 0, got {count!r}")
    templates = _templates(data["templates"], fail)
    subjects = phrases("subjects")
    if not subjects and any("{subject}" in t for t in templates["style"].solve + templates["style"].heldout):
        raise fail("subjects", "required: the style templates have {subject}")
    generic = tuple(lines_of(data["generic_templates"], "generic_templates")) if "generic_templates" in data else ("{concept}",)
    for i, template in enumerate(generic):
        if "{subject}" in template:  # a generic probe draws one of the subjects instead
            template = template.replace("{subject}", "{concept}")
        _check_template(template, ("concept",), f"generic_templates[{i}]", fail)
    return Vocabulary(
        name=name.strip(),
        styles=phrases("styles", required=True),
        objects=phrases("objects", required=True),
        characters=pairs("characters"),
        facts=pairs("facts"),
        people=phrases("people"),
        captions=phrases("captions", required=True),
        preserve_captions=count,
        subjects=subjects,
        styles_in_templates=phrases("styles_in_templates"),
        templates=templates,
        generic_templates=generic,
        source=str(path),
    )


def _templates(value: Any, fail) -> dict[str, Templates]:
    if not isinstance(value, dict):
        raise fail("templates", f"must be a mapping with {', '.join(ATTRIBUTES)}")
    out = {}
    for attribute in ATTRIBUTES:
        section = value.get(attribute)
        where = f"templates.{attribute}"
        if not isinstance(section, dict):
            raise fail(where, "missing: a mapping with solve and heldout lists")
        for key in section:
            if key not in ("solve", "heldout"):
                raise fail(f"{where}.{key}", "unknown field; valid fields: solve, heldout")
        lists = {}
        for key in ("solve", "heldout"):
            items = section.get(key)
            if not isinstance(items, list) or not items:
                raise fail(f"{where}.{key}", "must be a non-empty list of templates")
            for i, template in enumerate(items):
                _check_template(template, _SLOTS[attribute], f"{where}.{key}[{i}]", fail)
            lists[key] = tuple(items)
        shared = sorted(set(lists["solve"]) & set(lists["heldout"]))
        if shared:
            raise fail(f"{where}.heldout", f"must differ from the solve templates; {shared[0]!r} is in both")
        out[attribute] = Templates(lists["solve"], lists["heldout"])
    for key in value:
        if key not in ATTRIBUTES:
            raise fail(f"templates.{key}", f"unknown attribute; valid: {', '.join(ATTRIBUTES)}")
    return out


def _check_template(template: Any, slots: tuple[str, ...], where: str, fail) -> None:
    if not isinstance(template, str):
        raise fail(where, f"must be a string, got {template!r}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise fail(where, f"bad template {template!r} ({err})") from None
    if names.count("concept") != 1:
        raise fail(where, f"must contain {{concept}} exactly once: {template!r}")
    unknown = [n for n in names if n not in slots]
    if unknown:
        raise fail(where, f"unknown slot {{{unknown[0]}}} in {template!r}; valid: "
                          + ", ".join(f"{{{s}}}" for s in slots))
