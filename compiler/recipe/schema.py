"""The recipe's schema: frozen, typed dataclasses and the constants that bound their values.

See :mod:`compiler.recipe` for the file format these describe.
"""

from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The data schema imports no plug-in: which methods, method keys and formats exist is the
# registries' business (compiler.methods, compiler.export.formats), read by the validator.
ATTRIBUTES = ("style", "object", "fact")
LAYER_KEYWORDS = ("auto", "default")
RECIPE_SUFFIXES = (".yaml", ".yml", ".toml")

DEFAULT_MODEL = "toy"
from compiler.defaults import DEFAULT_LAMBDA  # noqa: E402,F401 (re-exported)
DEFAULT_NEIGHBOURS = 8  # neighbours found per edit (compiler.prompts.neighbours)
# Weight of the at-risk preservation rows (named ``preserve`` concepts and found neighbours)
# relative to the generic captions' (compiler.plan.preservation_groups). Measured on the toy
# world (README "Holding the neighbours"): at 1 snoopy's neighbours lose 6 points on held-out
# prompts (gate: 5); at 8 they lose 2, efficacy stays 0%, van gogh and the fact still pass.
DEFAULT_NEIGHBOUR_WEIGHT = 8.0
# The embedded toy model has SD-1.5's block layout: 16 cross-attention layers.
TOY_CROSS_ATTENTION_LAYERS = 16

# Set while the validator builds objects from file data it has already checked; objects built in
# code (the Python API) are validated by the same validator in ``__post_init__``.
_VALIDATING = contextvars.ContextVar("editc_recipe_validating", default=False)


@dataclass(frozen=True, kw_only=True)
class Edit:
    """One piece of knowledge to change: prompts with ``concept`` should behave as with
    ``replacement``.

    ``layers`` is ``"auto"``, ``"default"``, a tuple of cross-attention layer indices, or
    ``None`` for ``method="quickfix"`` (which edits the text encoder, not the UNet).
    ``lambda_`` is ``None`` when the edit inherits the recipe's λ. ``preserve`` lists only this
    edit's own preserved concepts; :meth:`Recipe.preserve_for` adds the global ones.
    A method's own recipe keys (Diff-QuickFix's ``site``, the neurons method's
    ``neurons_top_k``, a plug-in's) are not fields: they land in ``options`` (name, value pairs)
    and read as :meth:`option` or as attributes (``edit.site``), the owning method's default
    when the recipe leaves them out. In code, pass them as ``options=(("site", "v_proj"),)``.
    """

    concept: str
    replacement: str
    attribute: str
    method: str = "auto"
    layers: str | tuple[int, ...] | None = "auto"
    prompts: tuple[str, ...] = ()
    lambda_: float | None = None
    preserve: tuple[str, ...] = ()
    eos: bool | None = None  # None: the method's default (see ``default_eos``)
    options: tuple[tuple[str, Any], ...] = ()  # the methods' own keys

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def __getattr__(self, name: str) -> Any:
        """A method key as an attribute (``edit.site``): its value, else its owner's default."""
        if name.startswith("_"):
            raise AttributeError(name)
        from compiler.methods import method_fields

        owners = method_fields().get(name)
        if owners is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return self.option(name, owners[0][1].default)

    def __post_init__(self) -> None:
        if not _VALIDATING.get():  # built in code: the file rules apply, and normalise
            from compiler.recipe.validate import validated_edit

            _adopt(self, validated_edit(self.to_raw()))

    def to_raw(self) -> dict[str, Any]:
        """The recipe-file data of this edit (what a YAML mapping would hold)."""
        from compiler.methods import method_fields

        raw: dict[str, Any] = {"concept": self.concept, "replacement": self.replacement,
                               "attribute": self.attribute, "method": self.method}
        if self.layers is not None:
            raw["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        for key, value in (("prompts", self.prompts), ("preserve", self.preserve)):
            if value:
                raw[key] = [value] if isinstance(value, str) else list(value)
        if self.lambda_ is not None:
            raw["lambda"] = self.lambda_
        if self.eos is not None:
            raw["eos"] = self.eos
        for key, owners in method_fields().items():  # method-only keys that differ from defaults
            value = self.option(key)
            if value is not None and value != owners[0][1].default:
                raw[key] = value
        return raw


def _adopt(target: Any, validated: Any) -> None:
    """Copy a validated (normalised) object's fields onto a frozen dataclass being built."""
    for item in dataclasses.fields(target):
        object.__setattr__(target, item.name, getattr(validated, item.name))


def default_eos(method: str, site: str | None) -> bool:
    """Whether an edit remaps the end-of-text token when its recipe does not say: the method
    plug-in's default (:meth:`compiler.methods.base.EditMethod.default_eos`)."""
    from compiler.methods import get_method

    return get_method(method).default_eos(site)


@dataclass(frozen=True, kw_only=True)
class Outputs:
    """Where compile writes, and in which formats.

    ``dir`` is ``None`` when the recipe leaves it to ``editc compile --out``. ``formats`` is a
    non-empty tuple of ``diffusers`` (a diffusers folder), ``single-file`` (the original
    single-file checkpoint layout, A1111/ComfyUI), ``delta`` (only the edited tensors) and
    ``onnx`` (per-component ONNX folders). ``resolution`` (``WxH``) is written to a single file's
    ``modelspec.resolution``.
    """

    dir: str | None = None
    formats: tuple[str, ...] = ("diffusers",)
    # modelspec.resolution of a single-file output ("WxH"; None: the source's or the UNet's)
    resolution: str | None = None


@dataclass(frozen=True, kw_only=True)
class VerifyGates:
    """Thresholds of ``editc verify`` (exit 1 when one fails). Accuracies are the judge's
    zero-shot accuracies in [0, 1] on images generated with fixed seeds.

    - ``enabled``: run the gates right after ``editc compile``.
    - ``seeds``: seeds per prompt; ``steps``: sampler steps; ``guidance_scale``:
      classifier-free guidance scale (``None``: the model's usual value).
    - ``efficacy_max_accuracy``: style/object edits pass when the judge recognises the concept
      in at most this fraction of the edited model's images for the concept's prompts.
    - ``fact_min_accuracy``: fact edits pass when the replacement (the new fact) is recognised
      in at least this fraction.
    - ``generalization_max_accuracy``: like efficacy, on held-out paraphrases the solve never
      saw; ``None`` reports it without gating.
    - ``specificity_max_drop``: accuracy on neighbouring concepts (``neighbours``, the
      preserve lists and a generic set) may fall by at most this much versus the base model.
    - ``neighbours``: extra concepts to check for specificity.
    """

    enabled: bool = False
    seeds: int = 4
    steps: int = 25
    guidance_scale: float | None = None
    efficacy_max_accuracy: float = 0.2
    fact_min_accuracy: float = 0.7
    generalization_max_accuracy: float | None = None
    specificity_max_drop: float = 0.05
    neighbours: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A validated recipe. ``path`` is the file as given; ``sha256`` hashes its exact bytes
    (provenance metadata of every artifact records it)."""

    path: str = "<python>"
    model: str = DEFAULT_MODEL
    # epsilon | v_prediction, for an SD-2 single file that does not record it (None: the file's)
    prediction_type: str | None = None
    edits: tuple[Edit, ...]
    outputs: Outputs = field(default_factory=Outputs)
    verify: VerifyGates = field(default_factory=VerifyGates)
    preserve: tuple[str, ...] = ()
    lambda_: float = DEFAULT_LAMBDA
    # The vocabulary file the recipe names (resolved against the recipe's folder), or None:
    # the model's own (compiler.prompts.vocabulary_for).
    vocabulary: str | None = None
    # How many neighbours per edit compile finds and keeps put (and verify checks).
    neighbours: int = DEFAULT_NEIGHBOURS
    # How much more the solve holds those neighbours (and ``preserve``) than generic captions.
    neighbour_weight: float = DEFAULT_NEIGHBOUR_WEIGHT
    source_text: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        if not _VALIDATING.get():  # built in code: the file rules apply, and normalise
            from compiler.recipe.validate import validated_recipe

            _adopt(self, validated_recipe(self))

    def to_raw(self) -> dict[str, Any]:
        """The recipe-file data (what ``yaml.safe_load`` of an equivalent file would give)."""
        raw: dict[str, Any] = {"model": self.model, "lambda": self.lambda_,
                               "edits": [edit.to_raw() if isinstance(edit, Edit) else edit for edit in self.edits]}
        if self.prediction_type is not None:
            raw["prediction_type"] = self.prediction_type
        if self.preserve:
            raw["preserve"] = [self.preserve] if isinstance(self.preserve, str) else list(self.preserve)
        if self.vocabulary is not None:
            raw["vocabulary"] = self.vocabulary
        if self.neighbours != DEFAULT_NEIGHBOURS:
            raw["neighbours"] = self.neighbours
        if self.neighbour_weight != DEFAULT_NEIGHBOUR_WEIGHT:
            raw["neighbour_weight"] = self.neighbour_weight
        outputs = {"formats": list(self.outputs.formats)}
        if self.outputs.dir is not None:
            outputs["dir"] = self.outputs.dir
        if self.outputs.resolution is not None:
            outputs["resolution"] = self.outputs.resolution
        raw["outputs"] = outputs
        raw["verify"] = _tuples_to_lists(dataclasses.asdict(self.verify))
        return raw

    @property
    def is_toy_model(self) -> bool:
        return self.model == DEFAULT_MODEL

    def lambda_for(self, edit: Edit) -> float:
        """The λ of this edit's rows: its own, else the recipe's."""
        return self.lambda_ if edit.lambda_ is None else edit.lambda_

    def preserve_for(self, edit: Edit) -> tuple[str, ...]:
        """Global preserved concepts followed by the edit's own, without duplicates."""
        return tuple(dict.fromkeys(self.preserve + edit.preserve))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (for ``--json`` and manifests); no source text."""
        data = dataclasses.asdict(self)
        data.pop("source_text")
        data["lambda"] = data.pop("lambda_")
        for edit, built in zip(data["edits"], self.edits):
            edit["lambda"] = edit.pop("lambda_")
            from compiler.methods import method_fields

            for key in method_fields():  # the method keys as before: flat, with their defaults
                edit[key] = getattr(built, key)
            edit["options"] = [[k, v] for k, v in built.options if k not in edit]
            if isinstance(edit["layers"], tuple):
                edit["layers"] = list(edit["layers"])
        return _tuples_to_lists(data)


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _tuples_to_lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(item) for item in value]
    return value
