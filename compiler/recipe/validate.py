"""Validating parsed recipe data field by field; every failure is one line naming the file,
the field path and what would be valid."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compiler.errors import UserError
from compiler.methods import AUTO, get_method, method_fields, method_names
from compiler.export.formats import format_names
from compiler.recipe.schema import (ATTRIBUTES, DEFAULT_LAMBDA, DEFAULT_MODEL, DEFAULT_NEIGHBOURS, DEFAULT_NEIGHBOUR_WEIGHT,
                                    LAYER_KEYWORDS, TOY_CROSS_ATTENTION_LAYERS, Edit, Outputs, Recipe,
                                    VerifyGates, _VALIDATING)

# Ranges of the numeric fields. λ: below 1e-6 the ridge term no longer keeps the normal matrix
# positive definite in float64 (λ = 5e-324 fails the factorisation); above 1e6 it swamps any
# edit (λ = 1e308 returns the old weights). A method's own keys (neurons_top_k) are bounded by
# its plug-in.
LAMBDA_RANGE = (1e-6, 1e6)
MAX_LAYER_INDEX = 1023
MAX_VERIFY_SEEDS = 1024
MAX_VERIFY_STEPS = 1000
GUIDANCE_RANGE = (1e-3, 100.0)

_TOP_LEVEL_KEYS = ("model", "prediction_type", "lambda", "preserve", "edits", "outputs", "verify", "vocabulary",
                   "neighbours", "neighbour_weight")
MAX_NEIGHBOURS = 256
NEIGHBOUR_WEIGHT_RANGE = (1e-3, 1e3)
_EDIT_KEYS = (
    "concept",
    "replacement",
    "attribute",
    "method",
    "layers",
    "prompts",
    "lambda",
    "preserve",
    "eos",
)  # then the method plug-ins' own keys (read from the registry when validating)
_OUTPUT_KEYS = ("dir", "formats", "resolution")
_VERIFY_KEYS = tuple(f.name for f in dataclasses.fields(VerifyGates))


# Unicode categories that draw nothing: format characters (zero-width space/joiners, bidi
# marks, BOM), separators, and unassigned code points.
_INVISIBLE_CATEGORIES = ("Cf", "Zs", "Zl", "Zp", "Cn")


class _Validator:
    """Reads plain data (from YAML/TOML) field by field; each failure names the field path."""

    def __init__(self, label: str):
        self.label = label

    def fail(self, field_path: str, message: str) -> UserError:
        prefix = f"{self.label}: {field_path}: " if field_path else f"{self.label}: "
        return UserError(prefix + message)

    # -- structure -----------------------------------------------------------------------

    def mapping(self, value: Any, field_path: str, allowed: tuple[str, ...]) -> Mapping:
        if not isinstance(value, Mapping):
            valid = ", ".join(allowed)
            raise self.fail(
                field_path, f"expected a mapping with keys among {valid}; got {_describe(value)}"
            )
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                raise self.fail(
                    _join(field_path, str(key)), _unknown_key_message(key, allowed)
                )
        return value

    # -- scalars -------------------------------------------------------------------------

    def text(self, value: Any, field_path: str) -> str:
        if not isinstance(value, str):
            hint = ""
            if isinstance(value, bool):
                hint = " (YAML reads yes/no/on/off/true/false as booleans: put the text in quotes)"
            raise self.fail(field_path, f"expected a text string, got {_describe(value)}{hint}")
        control = next((c for c in value if unicodedata.category(c) == "Cc" and not c.isspace()), None)
        if control is not None:
            raise self.fail(field_path, f"contains the control character U+{ord(control):04X}; "
                                        "remove it (text fields are plain words)")
        cleaned = " ".join(value.split())
        if not cleaned:
            raise self.fail(field_path, "is empty; give a non-empty text")
        if not any(unicodedata.category(c) not in _INVISIBLE_CATEGORIES for c in cleaned):
            raise self.fail(field_path, f"{value!r} has no visible character (only zero-width or "
                                        "formatting characters); give words")
        return cleaned

    def choice(self, value: Any, field_path: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str):
            raise self.fail(
                field_path, f"expected one of {', '.join(choices)}, got {_describe(value)}"
            )
        normalized = value.strip().lower()
        if normalized not in choices:
            raise self.fail(field_path, f"{value!r} is not one of {', '.join(choices)}")
        return normalized

    def boolean(self, value: Any, field_path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field_path, f"expected true or false, got {_describe(value)}")
        return value

    def integer(self, value: Any, field_path: str, minimum: int, maximum: int) -> int:
        valid = f"a whole number from {minimum} to {maximum}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field_path, f"expected {valid}, got {_describe(value)}")
        if value < minimum:
            raise self.fail(field_path, f"{value} is too small; use {valid}")
        if value > maximum:
            raise self.fail(field_path, f"{str(value)[:24]} is too large; use {valid}")
        return value

    def number(
        self,
        value: Any,
        field_path: str,
        *,
        positive: bool = False,
        unit_interval: bool = False,
        bounds: tuple[float, float] | None = None,
    ) -> float:
        valid = ("a number > 0" if positive else "a number between 0 and 1" if unit_interval else "a number")
        if bounds is not None:
            valid = f"a number from {bounds[0]:g} to {bounds[1]:g}"
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # PyYAML reads "1e-2" (no dot) as text; accept any text that is a plain number.
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None:
            raise self.fail(field_path, f"expected {valid}, got {_describe(value)}")
        if not math.isfinite(number):
            raise self.fail(field_path, f"{value!r} is not finite; use {valid}")
        if positive and number <= 0:
            raise self.fail(field_path, f"{_fmt_number(value)} must be > 0 (e.g. 0.01)")
        if unit_interval and not 0.0 <= number <= 1.0:
            raise self.fail(field_path, f"{_fmt_number(value)} is outside [0, 1]; use {valid}")
        if bounds is not None and not bounds[0] <= number <= bounds[1]:
            raise self.fail(field_path, f"{_fmt_number(value)} is outside the valid range; use {valid}")
        return number

    def text_list(self, value: Any, field_path: str, *, what: str) -> tuple[str, ...]:
        if isinstance(value, str):
            raise self.fail(
                field_path, f"expected a list of {what}, got a single text; write [{value!r}]"
            )
        if not isinstance(value, list):
            raise self.fail(field_path, f"expected a list of {what}, got {_describe(value)}")
        items: list[str] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(value):
            item_path = f"{field_path}[{index}]"
            cleaned = self.text(item, item_path)
            key = _concept_key(cleaned)
            if key in seen:
                raise self.fail(item_path, f"{cleaned!r} repeats {field_path}[{seen[key]}]; list it once")
            seen[key] = index
            items.append(cleaned)
        return tuple(items)

    # -- sections ------------------------------------------------------------------------

    def recipe(self, data: Any, source_text: str, sha256: str) -> Recipe:
        if data is None:
            raise self.fail("", "the file is empty; a recipe needs at least an 'edits' list")
        if not isinstance(data, Mapping):
            raise self.fail(
                "",
                f"the file holds {_describe(data)}; a recipe is a mapping with keys "
                f"{', '.join(_TOP_LEVEL_KEYS)}",
            )
        self.mapping(data, "", _TOP_LEVEL_KEYS)

        model = self.text(data["model"], "model") if "model" in data and data["model"] is not None else DEFAULT_MODEL
        lambda_ = (
            self.number(data["lambda"], "lambda", positive=True, bounds=LAMBDA_RANGE)
            if data.get("lambda") is not None
            else DEFAULT_LAMBDA
        )
        preserve = (
            self.text_list(data["preserve"], "preserve", what="concept names")
            if data.get("preserve") is not None
            else ()
        )
        if "edits" not in data or data["edits"] is None:
            raise self.fail("edits", "missing; list at least one edit with concept, replacement and attribute")
        raw_edits = data["edits"]
        if isinstance(raw_edits, Mapping):
            raise self.fail("edits", "expected a list of edits, got a single mapping; put '- ' before it (YAML) or use [[edits]] (TOML)")
        if not isinstance(raw_edits, list):
            raise self.fail("edits", f"expected a list of edits, got {_describe(raw_edits)}")
        if not raw_edits:
            raise self.fail("edits", "is empty; list at least one edit with concept, replacement and attribute")
        edits = tuple(
            self.edit(raw, f"edits[{index}]", model) for index, raw in enumerate(raw_edits)
        )
        self.cross_check(edits, preserve)
        outputs = self.outputs(data.get("outputs"))
        verify = self.verify(data.get("verify"))
        prediction_type = (self.choice(data["prediction_type"], "prediction_type", ("epsilon", "v_prediction"))
                           if data.get("prediction_type") is not None else None)
        vocabulary = self.vocabulary(data.get("vocabulary"))
        neighbours = (self.integer(data["neighbours"], "neighbours", 0, MAX_NEIGHBOURS)
                      if data.get("neighbours") is not None else DEFAULT_NEIGHBOURS)
        neighbour_weight = (self.number(data["neighbour_weight"], "neighbour_weight", positive=True,
                                        bounds=NEIGHBOUR_WEIGHT_RANGE)
                            if data.get("neighbour_weight") is not None else DEFAULT_NEIGHBOUR_WEIGHT)
        return Recipe(
            path=self.label,
            model=model,
            prediction_type=prediction_type,
            edits=edits,
            outputs=outputs,
            verify=verify,
            preserve=preserve,
            lambda_=lambda_,
            vocabulary=vocabulary,
            neighbours=neighbours,
            neighbour_weight=neighbour_weight,
            source_text=source_text,
            sha256=sha256,
        )

    def vocabulary(self, raw: Any) -> str | None:
        """A vocabulary file (YAML/TOML, compiler.prompts schema), relative to the recipe; its
        own schema errors name that file and field."""
        if raw is None:
            return None
        text = self.text(raw, "vocabulary")
        path = Path(text).expanduser()
        if not path.is_absolute() and not self.label.startswith("<"):
            path = Path(self.label).parent / path
        if not path.is_file():
            raise self.fail("vocabulary", f"{text}: no such file; give a vocabulary YAML/TOML file "
                                          "(relative paths start at the recipe's folder)")
        from compiler.prompts import load_vocabulary

        load_vocabulary(path)  # fails with the vocabulary's file and field
        return str(path)

    def edit(self, raw: Any, field_path: str, model: str) -> Edit:
        if not isinstance(raw, Mapping):
            raise self.fail(
                field_path,
                f"expected a mapping with concept, replacement and attribute, got {_describe(raw)}",
            )
        self.mapping(raw, field_path, (*_EDIT_KEYS, *method_fields()))
        for required in ("concept", "replacement", "attribute"):
            if raw.get(required) is None:
                example = {
                    "concept": "the text to change, e.g. 'van gogh'",
                    "replacement": "what it should become, e.g. 'a painting'",
                    "attribute": "one of style, object, fact",
                }[required]
                raise self.fail(_join(field_path, required), f"missing; give {example}")
        concept = self.text(raw["concept"], _join(field_path, "concept"))
        replacement = self.text(raw["replacement"], _join(field_path, "replacement"))
        if _concept_key(concept) == _concept_key(replacement):
            raise self.fail(
                _join(field_path, "replacement"),
                f"{replacement!r} is the concept itself; give what {concept!r} should become",
            )
        attribute = self.choice(raw["attribute"], _join(field_path, "attribute"), ATTRIBUTES)
        method = (
            self.choice(raw["method"], _join(field_path, "method"), (AUTO, *method_names()))
            if raw.get("method") is not None
            else "auto"
        )
        layers = self.layers(raw.get("layers"), _join(field_path, "layers"), method, model)
        prompts = (
            self.text_list(raw["prompts"], _join(field_path, "prompts"), what="prompts")
            if raw.get("prompts") is not None
            else ()
        )
        for index, prompt in enumerate(prompts):
            if _concept_key(concept) not in _concept_key(prompt):
                raise self.fail(
                    f"{field_path}.prompts[{index}]",
                    f"{prompt!r} does not contain the concept {concept!r}; "
                    "extra prompts must mention it",
                )
        lambda_ = (
            self.number(raw["lambda"], _join(field_path, "lambda"), positive=True, bounds=LAMBDA_RANGE)
            if raw.get("lambda") is not None
            else None
        )
        preserve = (
            self.text_list(raw["preserve"], _join(field_path, "preserve"), what="concept names")
            if raw.get("preserve") is not None
            else ()
        )
        eos = self.boolean(raw["eos"], _join(field_path, "eos")) if raw.get("eos") is not None else None
        method_values = self.method_fields(raw, field_path, method)
        edit_fields = {f.name for f in dataclasses.fields(Edit)}
        return Edit(
            concept=concept,
            replacement=replacement,
            attribute=attribute,
            method=method,
            layers=layers,
            prompts=prompts,
            lambda_=lambda_,
            preserve=preserve,
            eos=eos,
            **{key: value for key, value in method_values.items() if key in edit_fields},
            options=tuple((key, value) for key, value in method_values.items() if key not in edit_fields),
        )

    def method_fields(self, raw: Mapping, field_path: str, method: str) -> dict[str, Any]:
        """The keys only some methods read, parsed by the method plug-in that owns each; a key
        given to an edit whose method does not read it is refused."""
        values: dict[str, Any] = {}
        for key, owners in method_fields().items():
            if raw.get(key) is None:
                continue
            path = _join(field_path, key)
            owner, spec = next(((m, s) for m, s in owners if m.name == method), owners[0])
            values[key] = spec.parse(self, raw[key], path)
            if method != owner.name and not (method == AUTO and spec.with_auto):
                names = " or ".join(m.name for m, _ in owners)
                hint = "" if spec.with_auto else f" or set method: {owners[0][0].name}"
                raise self.fail(path, f"only applies to method {names} (this edit uses {method}); remove it{hint}")
        return values

    def layers(
        self, value: Any, field_path: str, method: str, model: str
    ) -> str | tuple[int, ...] | None:
        if method != AUTO and not get_method(method).edits_unet_layers:
            if value is not None:
                raise self.fail(field_path, get_method(method).layers_refusal)
            return None
        if value is None:
            return "auto"
        valid = "use auto, default or a list of cross-attention layer indices like [8, 9]"
        if isinstance(value, str):
            if value.strip().lower() in LAYER_KEYWORDS:
                return value.strip().lower()
            raise self.fail(field_path, f"{value!r} is not a layer choice; {valid}")
        if not isinstance(value, list):
            raise self.fail(field_path, f"expected a list of layer indices, got {_describe(value)}; {valid}")
        if not value:
            raise self.fail(field_path, f"is an empty list; {valid}")
        indices: list[int] = []
        for position, item in enumerate(value):
            item_path = f"{field_path}[{position}]"
            if isinstance(item, bool) or not isinstance(item, int):
                raise self.fail(item_path, f"expected a whole-number layer index >= 0, got {_describe(item)}")
            if item < 0:
                raise self.fail(item_path, f"{item} is negative; layer indices count from 0")
            if item > MAX_LAYER_INDEX:
                raise self.fail(item_path, f"{str(item)[:24]} is out of range; no model has more than "
                                           f"{MAX_LAYER_INDEX + 1} cross-attention layers")
            if model == DEFAULT_MODEL and item >= TOY_CROSS_ATTENTION_LAYERS:
                raise self.fail(
                    item_path,
                    f"{item} is out of range: the toy model has {TOY_CROSS_ATTENTION_LAYERS} "
                    f"cross-attention layers (0..{TOY_CROSS_ATTENTION_LAYERS - 1})",
                )
            if item in indices:
                raise self.fail(item_path, f"layer {item} is listed twice; list each layer once")
            indices.append(item)
        return tuple(sorted(indices))

    def cross_check(self, edits: tuple[Edit, ...], preserve: tuple[str, ...]) -> None:
        """Rules that span several edits: one edit per concept, no chains, no conflicts with
        preserved concepts (a concept cannot be both changed and kept)."""
        first_edit_of: dict[str, int] = {}
        for index, edit in enumerate(edits):
            key = _concept_key(edit.concept)
            if key in first_edit_of:
                raise self.fail(
                    f"edits[{index}].concept",
                    f"{edit.concept!r} is already edited by edits[{first_edit_of[key]}]; "
                    "give each concept one edit",
                )
            first_edit_of[key] = index
        for index, edit in enumerate(edits):
            target = _concept_key(edit.replacement)
            if target in first_edit_of:
                raise self.fail(
                    f"edits[{index}].replacement",
                    f"{edit.replacement!r} is itself edited by edits[{first_edit_of[target]}]; "
                    "chained edits are not supported, use the final replacement",
                )
        for position, name in enumerate(preserve):
            if _concept_key(name) in first_edit_of:
                raise self.fail(
                    f"preserve[{position}]",
                    f"{name!r} is edited by edits[{first_edit_of[_concept_key(name)]}]; "
                    "a concept cannot be both edited and preserved",
                )
        for index, edit in enumerate(edits):
            for position, name in enumerate(edit.preserve):
                if _concept_key(name) in first_edit_of:
                    raise self.fail(
                        f"edits[{index}].preserve[{position}]",
                        f"{name!r} is edited by edits[{first_edit_of[_concept_key(name)]}]; "
                        "a concept cannot be both edited and preserved",
                    )

    def outputs(self, raw: Any) -> Outputs:
        if raw is None:
            return Outputs()
        self.mapping(raw, "outputs", _OUTPUT_KEYS)
        directory = self.text(raw["dir"], "outputs.dir") if raw.get("dir") is not None else None
        formats: tuple[str, ...] = ("diffusers",)
        if raw.get("formats") is not None:
            value = raw["formats"]
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise self.fail(
                    "outputs.formats",
                    f"expected a list of {', '.join(format_names())}, got {_describe(value)}",
                )
            if not value:
                raise self.fail("outputs.formats", f"is empty; list at least one of {', '.join(format_names())}")
            chosen: list[str] = []
            for index, item in enumerate(value):
                name = self.choice(item, f"outputs.formats[{index}]", format_names())
                if name in chosen:
                    raise self.fail(f"outputs.formats[{index}]", f"{name!r} is listed twice; list each format once")
                chosen.append(name)
            formats = tuple(chosen)
        resolution = None
        if raw.get("resolution") is not None:
            resolution = str(raw["resolution"]).strip().lower()
            if not re.fullmatch(r"[1-9][0-9]{0,5}x[1-9][0-9]{0,5}", resolution):
                raise self.fail("outputs.resolution", f"{raw['resolution']!r} is not WIDTHxHEIGHT, e.g. 768x768")
        return Outputs(dir=directory, formats=formats, resolution=resolution)

    def verify(self, raw: Any) -> VerifyGates:
        if raw is None:
            return VerifyGates()
        self.mapping(raw, "verify", _VERIFY_KEYS)
        defaults = VerifyGates()
        values: dict[str, Any] = {}
        for key, item in raw.items():
            path = f"verify.{key}"
            if item is None:
                if key in ("guidance_scale", "generalization_max_accuracy"):
                    values[key] = None
                continue
            if key == "enabled":
                values[key] = self.boolean(item, path)
            elif key in ("seeds", "steps"):
                values[key] = self.integer(item, path, 1, MAX_VERIFY_SEEDS if key == "seeds" else MAX_VERIFY_STEPS)
            elif key == "guidance_scale":
                values[key] = self.number(item, path, positive=True, bounds=GUIDANCE_RANGE)
            elif key == "neighbours":
                values[key] = self.text_list(item, path, what="concept names")
            else:  # the accuracy thresholds
                values[key] = self.number(item, path, unit_interval=True)
        return dataclasses.replace(defaults, **values)


def validated_edit(raw: Mapping) -> Edit:
    """An edit built in code, checked by the rules of a file's edit (layer ranges of a model and
    rules across edits are checked when it joins a :class:`Recipe`)."""
    token = _VALIDATING.set(True)
    try:
        return _Validator("Edit").edit(raw, "", None)
    finally:
        _VALIDATING.reset(token)


def validated_recipe(recipe: Recipe) -> Recipe:
    """A recipe built in code, checked exactly as a file would be."""
    import json

    raw = recipe.to_raw()
    token = _VALIDATING.set(True)
    try:
        validated = _Validator(recipe.path).recipe(raw, recipe.source_text, recipe.sha256)
    finally:
        _VALIDATING.reset(token)
    if not validated.sha256:  # provenance hashes the recipe; here, its canonical data
        text = recipe.source_text or json.dumps(raw, sort_keys=True)
        validated = dataclasses.replace(validated, source_text=text, sha256=hashlib.sha256(text.encode()).hexdigest())
    return validated


def parse_recipe(
    data: Any, *, path: str = "<recipe>", source_text: str = "", sha256: str = ""
) -> Recipe:
    """Validate already-parsed recipe data (a mapping as YAML/TOML would give)."""
    token = _VALIDATING.set(True)
    try:
        return _Validator(path).recipe(data, source_text, sha256)
    finally:
        _VALIDATING.reset(token)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _concept_key(text: str) -> str:
    """How concepts are compared: case-insensitive, whitespace collapsed (CLIP lower-cases)."""
    return " ".join(text.split()).casefold()


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _unknown_key_message(key: Any, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {hint}valid keys: {', '.join(allowed)}"


def _fmt_number(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{value}"


def _describe(value: Any) -> str:
    """A short, user-facing description of a parsed value's type."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__} ({value})"
