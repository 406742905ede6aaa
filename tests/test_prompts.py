"""Vocabularies, neighbours and per-concept weights (compiler.prompts, issue 14)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from compiler.compile import concept_weights
from compiler.errors import UserError
from compiler.prompts import (load_vocabulary, mentions, preserve_captions, prompt_pairs, real_vocabulary,
                              template_prompts, vocabulary_for)

REPO = Path(__file__).resolve().parents[1]
TOY_PIPELINE = REPO / "compiler" / "toy" / "weights" / "pipeline"


# --------------------------------------------------------------------------------------------
# The vocabularies
# --------------------------------------------------------------------------------------------


def test_the_real_vocabulary_is_large_and_its_heldout_templates_are_new():
    vocabulary = real_vocabulary()
    assert len(vocabulary.styles) >= 200
    assert len(vocabulary.objects) >= 150
    assert len(vocabulary.characters) >= 60
    assert len(vocabulary.facts) >= 40
    assert len(vocabulary.captions) >= 300
    for attribute in ("style", "object", "fact"):
        solve = set(template_prompts(vocabulary, "claude monet", attribute))
        heldout = set(template_prompts(vocabulary, "claude monet", attribute, heldout=True))
        assert solve and heldout and not solve & heldout
    pairs = prompt_pairs(vocabulary, "van gogh", "a painting", "style")
    assert pairs[0].source == "a house in the style of van gogh"
    assert pairs[0].target == "a house in the style of a painting"
    assert any(p.source == "a painting of a house by van gogh" for p in pairs)


def test_generic_captions_name_no_concept_of_the_vocabulary():
    vocabulary = real_vocabulary()
    named = [n for n, _ in vocabulary.characters] + list(vocabulary.styles) + [t for t, _ in vocabulary.facts]
    offending = [(c, n) for c in vocabulary.captions for n in named if mentions(c, n)]
    # Generic art techniques ("watercolor") may appear in a caption; names may not.
    assert all(n in {"watercolor", "oil painting", "mosaic", "graffiti", "origami"} for _, n in offending), offending
    kept = preserve_captions(vocabulary, ["a dog"])
    assert kept and not any(mentions(c, "a dog") for c in kept)


def test_no_product_module_reads_the_toy_world():
    """The toy world is an instrument: only compiler/toy (and compiler/testing) import it, and
    compiler/prompts imports nothing of compiler.toy."""
    offenders = []
    for path in (REPO / "compiler").rglob("*.py"):
        relative = path.relative_to(REPO / "compiler").as_posix()
        text = path.read_text()
        if relative.startswith(("toy/", "testing/")):
            continue
        if re.search(r"compiler\.toy(\.world| import (.*\b)?world\b)", text):
            offenders.append(relative)
        if relative.startswith("prompts/") and "compiler.toy" in text:
            offenders.append(relative)
    assert not offenders


def test_the_toy_model_brings_its_own_vocabulary_in_sync_with_its_world():
    from compiler.toy.vocabulary import VOCABULARY_FILE, vocabulary_text

    assert VOCABULARY_FILE.read_text() == vocabulary_text()  # python -m compiler.toy.vocabulary
    toy = vocabulary_for(TOY_PIPELINE)
    assert toy.name == "toy world"
    assert "van gogh" in toy.styles and ("snoopy", "a dog") in toy.characters
    assert template_prompts(toy, "van gogh", "style")[0] == "a red circle in the style of van gogh"
    assert vocabulary_for(REPO / "recipes").name == "real-world"  # a folder without its own


def test_vocabulary_schema_errors_name_the_file_and_the_field(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nstyles: [zorvak]\nobjects: [a lamp]\ncaptions: [a lamp on a desk]\n"
                    "templates:\n"
                    "  style: {solve: ['a lamp in the style of {concept}'], heldout: ['{concept} art']}\n"
                    "  object: {solve: ['{concept}'], heldout: ['a photo of {concept}']}\n"
                    "  fact: {solve: ['{concept}'], heldout: ['a photo of {concept}']}\n")
    mine = load_vocabulary(good)
    assert template_prompts(mine, "zorvak", "style") == ["a lamp in the style of zorvak"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("'{concept} art'", "'a lamp in the style of {concept}'"))
    with pytest.raises(UserError, match=r"bad\.yaml: templates\.style\.heldout: must differ"):
        load_vocabulary(bad)
    bad.write_text(good.read_text().replace("'{concept} art'", "'{artist} art'"))
    with pytest.raises(UserError, match=r"bad\.yaml: templates\.style\.heldout\[0\]"):
        load_vocabulary(bad)
    bad.write_text(good.read_text() + "colours: [red]\n")
    with pytest.raises(UserError, match=r"bad\.yaml: colours: unknown field"):
        load_vocabulary(bad)


def test_a_recipe_names_its_vocabulary_and_bad_ones_exit_2(tmp_path):
    from click.testing import CliRunner

    from compiler.cli import main
    from compiler.recipe import load_recipe

    vocabulary = tmp_path / "words.yaml"
    vocabulary.write_text((REPO / "compiler" / "prompts" / "data" / "real.yaml").read_text()
                          .replace("{file: ", "{file: " + str(REPO / "compiler" / "prompts" / "data") + "/"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("vocabulary: words.yaml\nneighbours: 3\n"
                      "edits: [{concept: van gogh, replacement: a painting, attribute: style}]\n")
    loaded = load_recipe(recipe)
    assert Path(loaded.vocabulary) == vocabulary and loaded.neighbours == 3
    vocabulary.write_text("name: broken\n")
    result = CliRunner().invoke(main, ["recipe", "check", str(recipe)])
    assert result.exit_code == 2
    assert "words.yaml: styles: missing" in result.output


# --------------------------------------------------------------------------------------------
# Neighbours
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_model():
    from compiler.models.load import load_model

    return load_model("toy")


def test_neighbours_are_ranked_in_the_models_space_deterministically(toy_model):
    from compiler import resolve

    vocabulary = resolve.vocabulary_of(toy_model)
    pipe = toy_model.pipeline

    def ranked(concept, attribute, replacement):
        return resolve.find_neighbours(pipe, vocabulary, concept, attribute, k=8, avoid=[replacement])

    monarch = ranked("the british monarch", "fact", "king charles")
    assert monarch == ranked("the british monarch", "fact", "king charles")  # deterministic
    # The fact's old answer is by far the nearest: the model draws her for the title.
    assert monarch[0].phrase == "queen elizabeth" and monarch[0].similarity > 0.9 > monarch[1].similarity
    assert "king charles" not in [n.phrase for n in monarch]
    assert ranked("snoopy", "object", "a dog")[0].phrase == "nemo"  # the other cartoon character
    styles = ranked("van gogh", "style", "a painting")
    assert sorted(n.phrase for n in styles) == ["mondrian", "monet", "picasso"]
    assert [n.similarity for n in styles] == sorted((n.similarity for n in styles), reverse=True)


# --------------------------------------------------------------------------------------------
# Every concept weighs the same
# --------------------------------------------------------------------------------------------


def test_every_concept_gets_the_same_total_weight():
    counts = [163 * 66, 24 * 66, 7]
    weights = concept_weights(counts, [0.01] * 3, 0.01)
    totals = [n * w for n, w in zip(counts, weights)]
    assert max(totals) == pytest.approx(min(totals))
    assert sum(totals) == pytest.approx(sum(counts))  # the edit rows' total weight is unchanged
    assert concept_weights([500], [0.01], 0.01) == [1.0]  # one concept: its tensors stay as they were
    # An edit's own λ keeps its meaning: half the λ, twice the pull.
    one, two = concept_weights([100, 300], [0.005, 0.01], 0.01)
    assert 100 * one == pytest.approx(2 * 300 * two)


def test_compile_weighs_edits_with_different_row_counts_equally(toy_model):
    from compiler.methods.quickfix import quickfix_rows as _quickfix_rows
    from compiler.plan import plan_edits
    from compiler.recipe import loads_recipe

    recipe = loads_recipe("neighbours: 0\nedits:\n"
                          "  - {concept: van gogh, replacement: a painting, attribute: style, method: quickfix}\n"
                          "  - {concept: snoopy, replacement: a dog, attribute: object, method: quickfix}\n")
    plans = plan_edits(recipe, toy_model)
    rows = _quickfix_rows(toy_model.pipeline.tokenizer, plans, recipe.lambda_)
    sizes = [2 * len(p.pairs) for p in plans]  # last subject token + EOS per prompt
    assert sizes[0] > 5 * sizes[1]
    first, second = rows.weights[: sizes[0]], rows.weights[sizes[0]:]
    assert float(first.sum()) == pytest.approx(float(second.sum()))


# --------------------------------------------------------------------------------------------
# Real families get the real vocabulary
# --------------------------------------------------------------------------------------------


def test_a_real_family_compile_uses_the_real_vocabulary(tiny, tmp_path):
    from compiler.compile import compile_to_disk
    from compiler.recipe import loads_recipe
    from compiler.toy import world

    checkpoint = tiny("sd1", "single-file")
    recipe = loads_recipe(f"model: {checkpoint}\nedits:\n"
                          "  - {concept: van gogh, replacement: a painting, attribute: style, layers: [0, 1]}\n"
                          "outputs: {formats: [delta]}\n", str(tmp_path / "real.yaml"))
    manifest = compile_to_disk(recipe, out=tmp_path / "out", progress=False, verify=False)
    assert manifest["vocabulary"]["name"] == "real-world"
    edit = manifest["edits"][0]
    toy_subjects = {f"a {c} {o}" for c in world.COLOURS for o in world.OBJECTS}
    assert edit["prompt_examples"] and not any(s in p for p in edit["prompt_examples"] for s in toy_subjects)
    assert edit["prompt_examples"][0] == "a house in the style of van gogh"
    styles = set(real_vocabulary().styles)
    assert len(edit["neighbours"]) == 8 and all(n["concept"] in styles for n in edit["neighbours"])
    assert not any("van gogh" in n["concept"] for n in edit["neighbours"])
    assert manifest["preservation"]["neighbours"] == [n["concept"] for n in edit["neighbours"]]
    # The neighbours' prompts are held harder than the generic captions (neighbour_weight).
    groups = {g["name"]: g for g in manifest["preservation"]["groups"]}
    assert list(groups) == ["at risk", "replacements", "captions"]
    assert groups["at risk"]["weight"] == recipe.neighbour_weight > groups["captions"]["weight"] == 1.0
    assert sum(g["prompts"] for g in groups.values()) == manifest["preservation"]["prompts"]
    nearest = edit["neighbours"][0]["concept"]
    assert any(nearest in p for p in groups["at risk"]["examples"])
    assert not any(n["concept"] in p for n in edit["neighbours"] for p in manifest["preservation"]["captions_examples"])
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["edits"][0]["neighbours"] == edit["neighbours"]
