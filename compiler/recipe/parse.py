"""Reading a recipe file: YAML (duplicate keys refused) or TOML, as UTF-8 text; syntax errors
name the line. What the parsed data means is checked by :mod:`compiler.recipe.validate`."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from compiler.errors import UserError
from compiler.recipe.schema import RECIPE_SUFFIXES, Recipe
from compiler.recipe.validate import parse_recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file; raise ``UserError`` (one line) on any problem."""
    label = str(path)
    file_path = Path(path)
    suffix = file_path.suffix.lower()
    if not file_path.exists():
        raise UserError(f"{label}: file not found; give the path of a .yaml, .yml or .toml recipe")
    if file_path.is_dir():
        raise UserError(f"{label}: is a directory; give the path of a .yaml, .yml or .toml recipe")
    if suffix not in RECIPE_SUFFIXES:
        raise UserError(
            f"{label}: unsupported recipe format '{file_path.suffix or '(no extension)'}'; "
            "use a .yaml, .yml or .toml file"
        )
    try:
        raw = file_path.read_bytes()
    except OSError as err:
        raise UserError(f"{label}: cannot read the file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{label}: not UTF-8 text (bad byte at offset {err.start}); save the recipe as UTF-8"
        ) from None
    data = _parse_toml(text, label) if suffix == ".toml" else _parse_yaml(text, label)
    return parse_recipe(data, path=label, source_text=text, sha256=hashlib.sha256(raw).hexdigest())


def loads_recipe(text: str, path: str = "<recipe>.yaml") -> Recipe:
    """Parse recipe text; the format follows ``path``'s extension (TOML for ``.toml``)."""
    data = _parse_toml(text, path) if path.lower().endswith(".toml") else _parse_yaml(text, path)
    return parse_recipe(
        data, path=path, source_text=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest()
    )


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode):
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=True)


_StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates
)


def _parse_yaml(text: str, label: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "cannot parse"
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"{label}: {where}: invalid YAML: {problem}{column}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{label}: invalid YAML: {' '.join(str(err).split())}") from None


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _parse_toml(text: str, label: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        position = _TOML_POSITION.search(message)
        if position:
            problem = message[: position.start()]
            raise UserError(
                f"{label}: line {position.group(1)}: invalid TOML: {problem}"
                f" (column {position.group(2)})"
            ) from None
        raise UserError(f"{label}: invalid TOML: {message}") from None
