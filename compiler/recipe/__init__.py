"""Recipes: the declarative file that says what knowledge to remove or update.

The package: :mod:`~compiler.recipe.schema` (the dataclasses), :mod:`~compiler.recipe.parse`
(reading YAML/TOML), :mod:`~compiler.recipe.validate` (what the data means).

A recipe is a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file. It is read into frozen,
typed dataclasses (:class:`Recipe`, :class:`Edit`, :class:`Outputs`, :class:`VerifyGates`)
and validated completely before anything heavy runs. Every mistake raises
:class:`~compiler.errors.UserError` with one line of the form::

    <file>: <field path>: <what is wrong and what would be valid>

e.g. ``recipes/x.yaml: edits[2].attribute: 'colour' is not one of style, object, fact``.
Syntax errors name the line instead of a field path.

The schema (every key except ``edits`` and each edit's ``concept``/``replacement``/``attribute``
is optional)::

    model: toy                 # "toy" (the embedded toy world) or a path to a diffusers folder
                               # or single-file checkpoint (relative to the current directory)
    prediction_type: epsilon   # SD-2 single files without metadata: epsilon (512-base) or
                               # v_prediction (768-v); default: what the file records
    lambda: 0.01               # ridge strength λ of the closed-form solve (> 0); default 0.01
    preserve: [monet]          # concepts every edit must leave unchanged (preservation rows)
    neighbours: 8              # nearest concepts found per edit in the model's text space, kept
                               # put by the solve and checked by verify (0: none)
    neighbour_weight: 8        # weight of those neighbours' (and ``preserve``'s) rows in the
                               # solve, relative to the generic captions' (> 0)
    vocabulary: words.yaml     # the words prompts are made of (compiler.prompts schema);
                               # default: the model's own (the toy's), else the real-world one
    edits:
      - concept: van gogh      # text to find in prompts: its last token is what gets remapped
        replacement: a painting  # what the concept should now mean
        attribute: style       # style | object | fact   (chooses prompt templates and gates)
        method: auto           # auto | locoedit | quickfix | neurons
        layers: auto           # auto | default | [8, 9]   (UNet cross-attention indices)
        prompts: ["a van gogh sunflower field"]   # extra prompts containing the concept
        lambda: 0.01           # overrides the top-level lambda for this edit's rows
        preserve: [mondrian]   # more concepts to keep put, for this edit
        eos: true              # also remap the end-of-text token (default: true, except
                               # quickfix at v_proj, where later tokens read the edit anyway)
        neurons_top_k: 50      # method neurons only: how many K/V output neurons to ablate
        site: v_proj           # method quickfix only: out_proj (the paper's) | v_proj
    outputs:
      dir: out/van_gogh        # default output folder (``editc compile --out`` overrides)
      formats: [diffusers]     # any of diffusers, single-file, delta, onnx
      resolution: 768x768      # a single file's modelspec.resolution (default: the source's)
    verify:
      enabled: false           # run the verify gates right after compile
      seeds: 4
      steps: 25
      efficacy_max_accuracy: 0.2
      fact_min_accuracy: 0.7
      specificity_max_drop: 0.05

Methods (Basu et al., ICLR 2024 and ICML 2024):

- ``locoedit``: closed-form update of the UNet cross-attention ``to_k``/``to_v`` weights of the
  located layers, so that the concept's token embedding produces what the old weights gave the
  replacement's embedding.
- ``quickfix`` (Diff-QuickFix): closed-form update of the text encoder's layer-0 self-attention;
  no UNet layers are involved, so ``layers`` must not be given. ``site`` says which projection:
  ``out_proj`` (the paper's, the default) or ``v_proj``, whose keys are the layer's inputs
  mixed by its own attention weights. Where layer 0 already resolves a fact (the concept's
  ``out_proj`` input is close to its old answer's), only ``v_proj`` can tell the two apart.
- ``neurons``: ablate the ``neurons_top_k`` K/V output neurons of the located layers whose
  activations differ most (z-score) between prompts with and without the concept.
- ``auto``: compile picks per model family and attribute and reports what it picked
  (facts on single-text-encoder models: ``quickfix`` at ``v_proj``; everything else:
  ``locoedit``).

Layers: ``auto`` uses the papers' known location for a known model family, else a cached or
fresh LocoGen localisation; ``default`` insists on the known location (compile fails when the
family has none); a list names the cross-attention layers by the papers' index (position in
the sorted list of ``attn2`` module names: 0..15 on SD-1.x/2.x and the toy model, 0..69 on
SD-XL). For ``quickfix`` the parsed value is ``None``.
"""

from __future__ import annotations

from compiler.recipe.parse import load_recipe, loads_recipe
from compiler.recipe.schema import (ATTRIBUTES, DEFAULT_LAMBDA, DEFAULT_MODEL, LAYER_KEYWORDS, RECIPE_SUFFIXES,
                                    TOY_CROSS_ATTENTION_LAYERS, Edit, Outputs, Recipe, VerifyGates, default_eos)
from compiler.recipe.validate import parse_recipe

# What the registries held at import (the validator reads them live); the built-in methods' own
# constants stay theirs (compiler.methods.neurons, compiler.methods.quickfix).
from compiler.export.formats import format_names as _format_names  # noqa: E402
from compiler.methods import AUTO as _AUTO, method_names as _method_names  # noqa: E402
from compiler.methods.neurons import DEFAULT_NEURONS_TOP_K  # noqa: E402
from compiler.methods.quickfix import SITES as QUICKFIX_SITES  # noqa: E402

METHODS = (_AUTO, *_method_names())
OUTPUT_FORMATS = _format_names()

__all__ = [
    "ATTRIBUTES", "DEFAULT_LAMBDA", "DEFAULT_MODEL", "DEFAULT_NEURONS_TOP_K", "LAYER_KEYWORDS",
    "METHODS", "OUTPUT_FORMATS", "QUICKFIX_SITES", "RECIPE_SUFFIXES", "TOY_CROSS_ATTENTION_LAYERS",
    "Edit", "Outputs", "Recipe", "VerifyGates", "default_eos", "load_recipe", "loads_recipe",
    "parse_recipe",
]
