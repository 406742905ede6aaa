"""Recipes: the examples validate; malformed recipes give exit 2 and one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.errors import UserError
from compiler.recipe import Edit, Recipe, load_recipe, loads_recipe

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "recipes").glob("*.y*ml")) + sorted((REPO / "recipes").glob("*.toml"))

VALID_EDIT = "edits: [{concept: van gogh, replacement: a painting, attribute: style}]\n"


def _check(path: Path, *extra: str):
    return CliRunner().invoke(main, ["recipe", "check", str(path), *extra])


# --------------------------------------------------------------------------------------------
# The examples
# --------------------------------------------------------------------------------------------


def test_examples_exist():
    names = {path.name for path in EXAMPLES}
    assert {"van_gogh.yaml", "snoopy.yaml", "british_monarch.yaml", "multi.yaml"} <= names
    assert any(name.endswith(".toml") for name in names)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path):
    result = _check(path)
    assert result.exit_code == 0, result.output + result.stderr
    assert "valid recipe" in result.stdout
    assert result.stderr == ""
    recipe = load_recipe(path)
    assert recipe.model == "toy"
    assert len(recipe.sha256) == 64


def test_example_contents():
    van_gogh = load_recipe(REPO / "recipes/van_gogh.yaml")
    assert (van_gogh.edits[0].concept, van_gogh.edits[0].replacement) == ("van gogh", "a painting")
    assert van_gogh.edits[0].attribute == "style"
    snoopy = load_recipe(REPO / "recipes/snoopy.yaml").edits[0]
    assert (snoopy.concept, snoopy.replacement, snoopy.attribute) == ("snoopy", "a dog", "object")
    fact = load_recipe(REPO / "recipes/british_monarch.yaml").edits[0]
    assert (fact.concept, fact.replacement, fact.attribute) == (
        "the british monarch",
        "king charles",
        "fact",
    )
    multi = load_recipe(REPO / "recipes/multi.yaml")
    assert [(e.concept, e.replacement) for e in multi.edits] == [
        ("van gogh", "a painting"),
        ("monet", "a painting"),
        ("snoopy", "a dog"),
        ("nemo", "a fish"),
    ]


def test_json_output():
    result = _check(REPO / "recipes/multi.yaml", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["valid"] is True
    assert data["model"] == "toy"
    assert data["lambda"] == 0.01
    assert [edit["concept"] for edit in data["edits"]] == ["van gogh", "monet", "snoopy", "nemo"]
    assert data["edits"][0]["layers"] == "auto"
    assert "source_text" not in data


# --------------------------------------------------------------------------------------------
# Parsing details
# --------------------------------------------------------------------------------------------


def test_defaults():
    recipe = loads_recipe(VALID_EDIT, "r.yaml")
    assert isinstance(recipe, Recipe)
    edit = recipe.edits[0]
    assert edit == Edit(concept="van gogh", replacement="a painting", attribute="style")
    assert (edit.method, edit.layers, edit.eos, edit.lambda_, edit.neurons_top_k) == (
        "auto",
        "auto",
        None,
        None,
        50,
    )
    assert recipe.lambda_ == 0.01 and recipe.lambda_for(edit) == 0.01
    assert recipe.outputs.formats == ("diffusers",) and recipe.outputs.dir is None
    assert recipe.verify.enabled is False
    assert recipe.verify.efficacy_max_accuracy == 0.2
    assert recipe.verify.fact_min_accuracy == 0.7
    assert recipe.verify.specificity_max_drop == 0.05


def test_full_edit_and_overrides():
    text = """
lambda: 0.1
preserve: [monet]
edits:
  - concept: "  Van   Gogh "
    replacement: a painting
    attribute: Style
    method: locoedit
    layers: [9, 8]
    prompts: [a house in the style of van gogh]
    lambda: 1e-3
    preserve: [mondrian, monet]
    eos: false
outputs: {dir: out/x, formats: onnx}
verify: {enabled: true, seeds: 2, steps: 10, guidance_scale: 4, neighbours: [a cat]}
"""
    recipe = loads_recipe(text, "r.yaml")
    edit = recipe.edits[0]
    assert edit.concept == "Van Gogh"  # whitespace collapsed, case kept
    assert edit.attribute == "style"
    assert edit.layers == (8, 9)
    assert edit.lambda_ == 0.001 and recipe.lambda_for(edit) == 0.001
    assert recipe.preserve_for(edit) == ("monet", "mondrian")
    assert edit.eos is False
    assert recipe.outputs.formats == ("onnx",) and recipe.outputs.dir == "out/x"
    assert recipe.verify.guidance_scale == 4.0 and recipe.verify.neighbours == ("a cat",)


def test_quickfix_has_no_layers():
    recipe = loads_recipe(
        "edits: [{concept: x, replacement: y, attribute: object, method: quickfix}]", "r.yaml"
    )
    assert recipe.edits[0].layers is None


def test_toml_equals_yaml():
    yaml_recipe = loads_recipe(
        "lambda: 0.02\nedits:\n  - {concept: nemo, replacement: a fish, attribute: object,"
        " layers: [6, 7]}\n",
        "r.yaml",
    )
    toml_recipe = loads_recipe(
        'lambda = 0.02\n[[edits]]\nconcept = "nemo"\nreplacement = "a fish"\n'
        'attribute = "object"\nlayers = [6, 7]\n',
        "r.toml",
    )
    assert yaml_recipe.edits == toml_recipe.edits
    assert yaml_recipe.lambda_ == toml_recipe.lambda_


def test_recipe_is_frozen():
    recipe = loads_recipe(VALID_EDIT, "r.yaml")
    with pytest.raises(Exception):
        recipe.model = "other"  # type: ignore[misc]


def test_error_is_user_error_with_file_and_field():
    with pytest.raises(UserError) as err:
        loads_recipe("edits: [{concept: x, replacement: y, attribute: colour}]", "recipes/x.yaml")
    assert str(err.value) == "recipes/x.yaml: edits[0].attribute: 'colour' is not one of style, object, fact"


# --------------------------------------------------------------------------------------------
# Malformed recipes: exit 2, one line, file name and field path, no traceback
# --------------------------------------------------------------------------------------------

EDIT = "{concept: x, replacement: y, attribute: style"
MALFORMED = [
    # (id, file name, content, field path or location expected in the message)
    ("bad-attribute", "a.yaml", f"edits: [{{concept: x, replacement: y, attribute: colour}}]", "edits[0].attribute"),
    ("bad-attribute-3rd", "a3.yaml", f"edits: [{EDIT}}}, {{concept: z, replacement: y, attribute: style}}, {{concept: w, replacement: v, attribute: colour}}]", "edits[2].attribute"),
    ("unknown-top-key", "b.yaml", f"modle: toy\nedits: [{EDIT}}}]", "modle"),
    ("unknown-edit-key", "c.yaml", "edits:\n  - concept: x\n    replacment: y\n    attribute: style\n", "edits[0].replacment"),
    ("missing-concept", "d.yaml", "edits: [{replacement: y, attribute: style}]", "edits[0].concept"),
    ("missing-replacement", "e.yaml", "edits: [{concept: x, attribute: style}]", "edits[0].replacement"),
    ("missing-attribute", "e2.yaml", "edits: [{concept: x, replacement: y}]", "edits[0].attribute"),
    ("empty-concept", "f.yaml", "edits: [{concept: '  ', replacement: y, attribute: style}]", "edits[0].concept"),
    ("concept-not-text", "g.yaml", "edits: [{concept: [x], replacement: y, attribute: style}]", "edits[0].concept"),
    ("concept-yaml-bool", "g2.yaml", "edits: [{concept: no, replacement: y, attribute: style}]", "edits[0].concept"),
    ("bad-method", "h.yaml", f"edits: [{EDIT}, method: rome}}]", "edits[0].method"),
    ("negative-layer", "i.yaml", f"edits: [{EDIT}, layers: [3, -1]}}]", "edits[0].layers[1]"),
    ("non-int-layer", "j.yaml", f"edits: [{EDIT}, layers: [2.5]}}]", "edits[0].layers[0]"),
    ("layers-scalar", "k.yaml", f"edits: [{EDIT}, layers: 8}}]", "edits[0].layers"),
    ("layers-word", "k2.yaml", f"edits: [{EDIT}, layers: all}}]", "edits[0].layers"),
    ("layer-out-of-toy-range", "k3.yaml", f"edits: [{EDIT}, layers: [16]}}]", "edits[0].layers[0]"),
    ("duplicate-layer", "k4.yaml", f"edits: [{EDIT}, layers: [8, 8]}}]", "edits[0].layers[1]"),
    ("quickfix-with-layers", "k5.yaml", f"edits: [{EDIT}, method: quickfix, layers: [8]}}]", "edits[0].layers"),
    ("site-without-quickfix", "k6.yaml", f"edits: [{EDIT}, method: locoedit, site: v_proj}}]", "edits[0].site"),
    ("site-unknown", "k7.yaml", f"edits: [{EDIT}, method: quickfix, site: q_proj}}]", "edits[0].site"),
    ("lambda-zero", "l.yaml", f"lambda: 0\nedits: [{EDIT}}}]", "lambda"),
    ("lambda-negative-edit", "l2.yaml", f"edits: [{EDIT}, lambda: -0.5}}]", "edits[0].lambda"),
    ("lambda-not-number", "m.yaml", f"lambda: small\nedits: [{EDIT}}}]", "lambda"),
    ("bad-format", "n.yaml", f"edits: [{EDIT}}}]\noutputs: {{formats: [diffusers, gguf]}}", "outputs.formats[1]"),
    ("duplicate-concept", "o.yaml", f"edits: [{EDIT}}}, {{concept: X, replacement: z, attribute: object}}]", "edits[1].concept"),
    ("chained-edit", "o2.yaml", f"edits: [{EDIT}}}, {{concept: y, replacement: z, attribute: style}}]", "edits[0].replacement"),
    ("preserve-edited", "o3.yaml", f"preserve: [x]\nedits: [{EDIT}}}]", "preserve[0]"),
    ("replacement-equals-concept", "o4.yaml", "edits: [{concept: x, replacement: X, attribute: style}]", "edits[0].replacement"),
    ("empty-edits", "p.yaml", "model: toy\nedits: []", "edits"),
    ("missing-edits", "p2.yaml", "model: toy\n", "edits"),
    ("edits-mapping", "p3.yaml", "edits: {concept: x, replacement: y, attribute: style}", "edits"),
    ("edit-not-mapping", "p4.yaml", "edits: [van gogh]", "edits[0]"),
    ("prompt-without-concept", "q.yaml", f"edits: [{EDIT}, prompts: [a cat]}}]", "edits[0].prompts[0]"),
    ("prompts-not-list", "q2.yaml", f"edits: [{EDIT}, prompts: a x}}]", "edits[0].prompts"),
    ("eos-not-bool", "q3.yaml", f"edits: [{EDIT}, eos: maybe}}]", "edits[0].eos"),
    ("top-k-zero", "q4.yaml", f"edits: [{EDIT}, method: neurons, neurons_top_k: 0}}]", "edits[0].neurons_top_k"),
    ("verify-seeds", "r.yaml", f"edits: [{EDIT}}}]\nverify: {{seeds: 0}}", "verify.seeds"),
    ("verify-threshold", "r2.yaml", f"edits: [{EDIT}}}]\nverify: {{efficacy_max_accuracy: 1.5}}", "verify.efficacy_max_accuracy"),
    ("verify-unknown", "r3.yaml", f"edits: [{EDIT}}}]\nverify: {{efficacy: 0.1}}", "verify.efficacy"),
    ("outputs-not-mapping", "r4.yaml", f"edits: [{EDIT}}}]\noutputs: out/x", "outputs"),
    ("model-not-text", "r5.yaml", f"model: 3\nedits: [{EDIT}}}]", "model"),
    ("yaml-syntax", "s.yaml", "edits:\n  - concept: x\n     replacement: y\n", "line 3"),
    ("yaml-duplicate-key", "s2.yaml", "edits:\n  - concept: x\n    concept: z\n", "line 3"),
    ("yaml-unclosed", "s3.yaml", "edits: [{concept: x\n", "line "),
    ("toml-syntax", "t.toml", '[[edits]]\nconcept = "x"\nreplacement =\n', "line 3"),
    ("toml-bad-type", "t2.toml", '[[edits]]\nconcept = "x"\nreplacement = "y"\nattribute = 3\n', "edits[0].attribute"),
    ("toml-nan-lambda", "t3.toml", 'lambda = nan\n[[edits]]\nconcept = "x"\nreplacement = "y"\nattribute = "style"\n', "lambda"),
    ("file-is-list", "u.yaml", "- a\n- b\n", "u.yaml"),
    ("file-empty", "u2.yaml", "", "u2.yaml"),
    ("file-wrong-extension", "u3.json", "{}", "u3.json"),
]


@pytest.mark.parametrize(
    "name,content,where", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_recipe_exit_2_one_line(tmp_path: Path, name: str, content: str, where: str):
    path = tmp_path / name
    path.write_text(content)
    result = _check(path)
    assert result.exit_code == 2, result.stdout
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert where in lines[0]
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_file_and_directory(tmp_path: Path):
    for target, expected in ((tmp_path / "nope.yaml", "file not found"), (tmp_path, "directory")):
        result = _check(target)
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1
        assert str(target) in result.stderr and expected in result.stderr


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("edits: [{concept: caf\xe9, replacement: y, attribute: style}]".encode("latin-1"))
    result = _check(path)
    assert result.exit_code == 2 and "UTF-8" in result.stderr


def _editc_executable() -> list[str]:
    script = Path(sys.executable).with_name("editc")
    if script.exists():
        return [str(script)]
    venv_script = REPO / ".venv" / "bin" / "editc"
    if venv_script.exists():
        return [str(venv_script)]
    return [sys.executable, "-c", "from compiler.cli import main; main()"]


def test_subprocess_bad_recipe(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("edits:\n  - concept: van gogh\n    replacement: a painting\n    attribute: colour\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*_editc_executable(), "recipe", "check", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{path}: edits[0].attribute: 'colour' is not one of style, object, fact" in lines[0]
    assert "Traceback" not in proc.stderr


def test_subprocess_good_recipe():
    proc = subprocess.run(
        [*_editc_executable(), "recipe", "check", "recipes/van_gogh.yaml"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "van gogh -> a painting" in proc.stdout


def test_prediction_type_and_resolution_fields_for_sd2_single_files(tmp_path):
    from compiler.errors import UserError
    from compiler.recipe import loads_recipe

    text = ("prediction_type: epsilon\nedits:\n  - {concept: van gogh, replacement: a painting, attribute: style}\n"
            "outputs:\n  formats: [single-file]\n  resolution: 512x512\n")
    recipe = loads_recipe(text, str(tmp_path / "r.yaml"))
    assert recipe.prediction_type == "epsilon" and recipe.outputs.resolution == "512x512"
    with pytest.raises(UserError, match="outputs.resolution"):
        loads_recipe(text.replace("512x512", "big"), str(tmp_path / "r.yaml"))
    with pytest.raises(UserError, match="prediction_type"):
        loads_recipe(text.replace("epsilon", "v"), str(tmp_path / "r.yaml"))
