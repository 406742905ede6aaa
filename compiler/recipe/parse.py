"""Reading a recipe file: YAML (duplicate keys refused) or TOML, as UTF-8 text; syntax errors
name the line. What the parsed data means is checked by :mod:`compiler.recipe.validate`."""

from __future__ import annotations

import hashlib
import re
import sys
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
    raw = _read_bounded(file_path, label)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{label}: not UTF-8 text (bad byte at offset {err.start}); save the recipe as UTF-8"
        ) from None
    data = _parse_toml(text, label) if suffix == ".toml" else _parse_yaml(text, label)
    check_bounds(data, label)
    return parse_recipe(data, path=label, source_text=text, sha256=hashlib.sha256(raw).hexdigest())


def loads_recipe(text: str, path: str = "<recipe>.yaml") -> Recipe:
    """Parse recipe text; the format follows ``path``'s extension (TOML for ``.toml``)."""
    if len(text) > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: the recipe is over {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a short text file")
    data = _parse_toml(text, path) if path.lower().endswith(".toml") else _parse_yaml(text, path)
    check_bounds(data, path)
    return parse_recipe(
        data, path=path, source_text=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest()
    )


# Bounds checked before (size, flow nesting) and right after parsing (depth, values, text),
# so that no input makes the parser or the validator recurse, hang or allocate without limit.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000  # after YAML aliases: ``&a [*b, *b, ...]`` chains expand exponentially
MAX_INTEGER = 2**63 - 1


def _read_bounded(file_path: Path, label: str) -> bytes:
    """The file's bytes, refusing what is not a regular file (a FIFO would block, /dev/zero
    never ends) and anything over ``MAX_RECIPE_BYTES``."""
    import os
    import stat

    try:
        descriptor = os.open(file_path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise UserError(f"{label}: cannot read the file ({err.strerror or err})") from None
    with os.fdopen(descriptor, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise UserError(f"{label}: is {kind}; give the path of a .yaml, .yml or .toml recipe file")
        try:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as err:
            raise UserError(f"{label}: cannot read the file ({err.strerror or err})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise UserError(f"{label}: the recipe is over {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a short text file")
    return raw


def _flow_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting, counted before parsing (quotes ignored: an upper bound)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def check_bounds(data: Any, label: str) -> None:
    """Walk the parsed data without recursion: nesting depth, number of values (aliases
    counted as often as they are used), integers that fit 64 bits, text that is valid Unicode
    (no lone surrogates); one line naming the field on the first violation."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    seen = 0
    while stack:
        value, where, depth = stack.pop()
        seen += 1
        field = where or "(top level)"
        if seen > MAX_VALUES:
            raise UserError(f"{label}: the recipe expands to more than {MAX_VALUES} values (YAML aliases?); "
                            f"write it out plainly")
        if depth > MAX_DEPTH:
            raise UserError(f"{label}: {field}: nested more than {MAX_DEPTH} levels deep; a recipe is shallow")
        if isinstance(value, bool) or value is None or isinstance(value, float):
            continue
        if isinstance(value, int):
            if abs(value) > MAX_INTEGER:
                raise UserError(f"{label}: {field}: the number has {len(str(abs(value)))} digits; use a number "
                                f"within ±{MAX_INTEGER}")
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"{label}: {field}: the text holds an unpaired surrogate (e.g. \\ud800), "
                                f"which is not Unicode text; remove it") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, f"{where}{'.' if where else ''}<key>", depth + 1))
                stack.append((item, f"{where}{'.' if where else ''}{str(key)[:40]}", depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value))


def _parser_problem(err: Exception) -> str:
    if "integer string conversion" in str(err):
        return f"a number has more digits than Python reads ({sys.get_int_max_str_digits()}); use a number within ±{MAX_INTEGER}"
    return " ".join(str(err).split())[:160]


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
    if _flow_depth(text) > MAX_DEPTH:
        raise UserError(f"{label}: nested more than {MAX_DEPTH} levels deep ([ or {{ ); a recipe is shallow")
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
    except RecursionError:
        raise UserError(f"{label}: invalid YAML: nested too deeply; a recipe is shallow") from None
    except (ValueError, OverflowError, TypeError) as err:  # e.g. an integer past Python's digit limit
        raise UserError(f"{label}: invalid YAML: {_parser_problem(err)}") from None


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _parse_toml(text: str, label: str) -> Any:
    import tomllib

    if _flow_depth(text) > MAX_DEPTH:
        raise UserError(f"{label}: nested more than {MAX_DEPTH} levels deep ([ or {{ ); a recipe is shallow")
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
    except RecursionError:
        raise UserError(f"{label}: invalid TOML: nested too deeply; a recipe is shallow") from None
    except (ValueError, OverflowError, TypeError) as err:  # e.g. an integer past Python's digit limit
        raise UserError(f"{label}: invalid TOML: {_parser_problem(err)}") from None
