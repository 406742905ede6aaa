"""editc verify: gates, exit codes and reports.

Most tests use a toy model trained for a few steps (garbage pictures, exact structure) as the
base model, and a copy of it as a "useless edit": with identical models no edit can be seen,
so the efficacy gate must fail with exit 1 while every gate still computes. The test that a
real edit passes needs the trained toy weights and runs whenever they exist.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.recipe import VerifyGates, loads_recipe
from compiler.toy import JUDGE_DIR, PIPELINE_DIR
from compiler.verify.gates import evaluate_gates
from compiler.verify.judges import STYLE, SUBJECT, ToyWorldJudge, choose_judge
from compiler.verify.metrics import GroupResult, ImageScores, ModelScores, Sample, SubjectScores
from compiler.verify.probes import EFFICACY, GENERALIZATION, GENERIC, SPECIFICITY, plan_probes

REPO = Path(__file__).resolve().parents[1]
VAN_GOGH = REPO / "recipes" / "van_gogh.yaml"
# Tiny settings: the quick model's images are noise anyway; every gate still computes.
FAST = ["--seeds", "1", "--steps", "2", "--prompts", "2", "--quiet"]


def _verify(*args: str):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


@pytest.fixture(scope="module")
def useless_edit(quick_toy, tmp_path_factory) -> Path:
    """An "edited" model identical to its base."""
    edited = tmp_path_factory.mktemp("useless") / "edited"
    shutil.copytree(quick_toy, edited)
    return edited


@pytest.fixture(scope="module")
def useless_run(quick_toy, useless_edit, tmp_path_factory):
    """One verify of the useless edit with reports; several tests read its outputs."""
    report_dir = tmp_path_factory.mktemp("report")
    result = _verify(VAN_GOGH, "--edited", useless_edit, "--base", quick_toy, "--report", report_dir, "--json", *FAST)
    return result, report_dir


# --------------------------------------------------------------------------------------------
# The useless edit: exit 1, and reports that say why
# --------------------------------------------------------------------------------------------


def test_useless_edit_fails_its_efficacy_gate_with_exit_1(useless_run):
    result, _ = useless_run
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert "edits[0].efficacy" in report["failed_gates"]
    # Identical models: nothing moved, so every specificity gate passes with a zero distance.
    specificity = [g for g in report["gates"] if g["name"].endswith("specificity")]
    assert specificity and all(g["passed"] and g["value"] == 0 for g in specificity)
    assert report["edits"][0]["groups"]["specificity"]["feature_distance"] == 0
    assert "edits[0].efficacy" in result.stderr


def test_junit_xml_parses_and_names_every_failing_gate(useless_run):
    result, report_dir = useless_run
    report = json.loads(result.stdout)
    root = ET.parse(report_dir / "junit.xml").getroot()
    cases = root.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == [g["name"] for g in report["gates"]]
    failing = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failing == report["failed_gates"] and failing
    for case in cases:
        if case.find("failure") is not None:
            assert case.get("name") in case.find("failure").get("message")
    suite = root.find("testsuite")
    assert int(suite.get("failures")) == len(failing)
    assert int(suite.get("tests")) == len(cases)
    assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases)


def _numbers_are_finite(value, path="report"):
    if isinstance(value, float):
        assert math.isfinite(value), path
    elif isinstance(value, dict):
        for key, item in value.items():
            _numbers_are_finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _numbers_are_finite(item, f"{path}[{index}]")


def test_json_report_has_every_number(useless_run):
    result, report_dir = useless_run
    on_disk = json.loads((report_dir / "verify.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    printed = json.loads(result.stdout)
    assert on_disk["gates"] == printed["gates"]
    _numbers_are_finite(on_disk)
    settings = on_disk["settings"]
    assert settings["seeds"] == [0] and settings["steps"] == 2
    assert on_disk["models"]["base"]["sha256"] == on_disk["models"]["edited"]["sha256"]
    for gate in on_disk["gates"]:
        assert isinstance(gate["value"], (int, float))
        assert gate["skipped"] or isinstance(gate["threshold"], (int, float))
    groups = on_disk["edits"][0]["groups"]
    assert set(groups) == {EFFICACY, GENERALIZATION, SPECIFICITY}
    for name, group in [*groups.items(), ("generic", on_disk["generic"])]:
        for model in ("base", "edited"):
            assert 0 <= group[model]["accuracy"] <= 1
            assert -1 <= group[model]["clip_prompt"] <= 1
        assert group["images"] == len(group["samples"]) == len(group["prompts"]) * len(group["seeds"])
        sample = group["samples"][0]
        assert {"prompt", "seed", "subject", "base", "edited", "feature_distance"} <= set(sample)
        assert {"label", "shows_subject", "clip_prompt"} <= set(sample["base"])
        if name in (EFFICACY, GENERALIZATION):
            assert group["base"]["clip_target"] is not None and group["change"]["clip_target"] == 0
    assert printed["reports"]["html"].endswith("report.html")


def test_html_report_is_self_contained_with_image_grids(useless_run):
    from PIL import Image

    _, report_dir = useless_run
    page = (report_dir / "report.html").read_text()
    assert "FAILED" in page and "edits[0].efficacy" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    report = json.loads((report_dir / "verify.json").read_text())
    prompts = sum(len(g["prompts"]) for g in [*report["edits"][0]["groups"].values(), report["generic"]])
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) == 2 * prompts  # one strip per prompt and model
    strip = Image.open(io.BytesIO(base64.b64decode(images[0].split('"')[0])))
    assert strip.size[0] >= 32 and strip.size[1] >= 32


def test_existing_reports_are_not_overwritten_without_force(useless_run, quick_toy, useless_edit):
    _, report_dir = useless_run
    before = (report_dir / "verify.json").read_bytes()
    result = _verify(VAN_GOGH, "--edited", useless_edit, "--base", quick_toy, "--report", report_dir, *FAST)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (report_dir / "verify.json").read_bytes() == before


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one line
# --------------------------------------------------------------------------------------------


def test_bad_input_exits_2_with_one_line(quick_toy, useless_edit, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("edits: [{concept: van gogh, replacement: a painting, attribute: colour}]\n")
    unknown_style = tmp_path / "cubism.yaml"
    unknown_style.write_text("edits: [{concept: cubism, replacement: a painting, attribute: style}]\n")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    cases = [
        ([tmp_path / "missing.yaml", "--edited", useless_edit, "--base", quick_toy], "missing.yaml"),
        ([broken, "--edited", useless_edit, "--base", quick_toy], "edits[0].attribute"),
        ([VAN_GOGH, "--edited", tmp_path / "nowhere", "--base", quick_toy], "nowhere"),
        ([VAN_GOGH, "--edited", not_a_model, "--base", quick_toy], "model_index.json"),
        ([VAN_GOGH, "--edited", useless_edit, "--base", quick_toy, "--judge", tmp_path / "no-clip"], "--judge"),
        ([VAN_GOGH, "--edited", useless_edit, "--base", quick_toy, "--clip", not_a_model], "config.json"),
        ([unknown_style, "--edited", useless_edit, "--base", quick_toy], "cubism"),
    ]
    for args, expected in cases:
        result = _verify(*args, *FAST)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("editc: error:") and expected in lines[0], lines
        assert "Traceback" not in result.output


def test_a_model_without_a_judge_asks_for_clip(quick_toy, tmp_path):
    lonely = tmp_path / "models" / "pipeline"  # no judge folder beside it
    shutil.copytree(quick_toy, lonely)
    result = _verify(VAN_GOGH, "--edited", lonely, "--base", lonely, *FAST)
    assert result.exit_code == 2 and "--judge" in result.stderr


# --------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------


def _write_clip_folder(folder: Path) -> Path:
    """A tiny random transformers CLIPModel folder with the real CLIP tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(str(REPO / "compiler" / "assets" / "tokenizers" / "clip")).save_pretrained(folder)
    return folder


def test_clip_folder_judge_scores_and_identifies(tmp_path):
    judge = choose_judge(_write_clip_folder(tmp_path / "clip"), None, None)
    assert not judge.is_toy_world
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)  # resized + cropped
    features = judge.embed_images(images)
    assert features.shape == (3, 16)
    assert np.allclose(features.norm(dim=-1).numpy(), 1, atol=1e-5)
    scores = judge.clip_scores(features, ["a photo of a dog", "a photo of snoopy", "a photo of a dog"])
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1)
    labels = judge.identify(features, STYLE, ["Van Gogh", "monet"])
    # Without a model folder, a CLIP folder judge classifies over the real-world vocabulary.
    assert judge.vocabulary.name == "real-world"
    assert set(labels) <= set(judge.vocabulary.styles) | {"van gogh", "monet"}
    assert judge.label_of("Van  Gogh", STYLE) == "van gogh"
    assert judge.label_of("the British monarch", SUBJECT) == "queen elizabeth ii"


def test_verify_with_a_clip_folder_judge(quick_toy, useless_edit, tmp_path):
    clip = _write_clip_folder(tmp_path / "clip")
    result = _verify(VAN_GOGH, "--edited", useless_edit, "--base", quick_toy, "--clip", clip, "--clip-x100",
                     "--json", "--seeds", "1", "--steps", "1", "--prompts", "1", "--quiet")
    assert result.exit_code == 1, result.output  # identical models: the edit cannot be seen
    report = json.loads(result.stdout)
    assert report["judge"].startswith("CLIP model folder") and report["settings"]["clip_scale"] == 100
    assert abs(report["edits"][0]["groups"]["efficacy"]["base"]["clip_prompt"]) <= 100


def test_toy_judge_knows_the_world():
    judge = ToyWorldJudge(toy_judge=None, description="labels only")
    assert judge.label_of("the British monarch", SUBJECT) == "queen elizabeth"
    assert judge.label_of("a dog", SUBJECT) == "dog"
    assert judge.label_of("a red dog", SUBJECT) == "dog"
    assert judge.label_of("snoopy", SUBJECT) == "snoopy"
    assert judge.label_of("van gogh", STYLE) == "van gogh"


# --------------------------------------------------------------------------------------------
# Probes and gates, without generating
# --------------------------------------------------------------------------------------------


def test_probes_are_deterministic_and_keep_edited_concepts_out_of_specificity():
    from compiler.prompts import vocabulary_for

    recipe = loads_recipe((REPO / "recipes" / "multi.yaml").read_text(), "multi.yaml")
    toy = vocabulary_for(REPO / "compiler" / "toy" / "weights" / "pipeline")
    found = {0: [("picasso", 0.83), ("mondrian", 0.81)], 2: [("r2d2", 0.6), ("a triangle", 0.8)]}
    first = plan_probes(recipe, seeds=2, vocabulary=toy, found=found)
    assert first == plan_probes(recipe, seeds=2, vocabulary=toy, found=found)
    # Found neighbours are probed after the recipe's own and named with their similarity.
    assert "picasso (0.83)" in first.group(SPECIFICITY, 0).description
    assert [n for n, _ in first.neighbours[0]] == ["mondrian", "picasso", "r2d2"]
    edited = ["van gogh", "monet", "snoopy", "nemo"]
    for group in first.groups:
        if group.name in (SPECIFICITY, GENERIC):
            for probe in group.probes:
                assert not any(concept in probe.prompt for concept in edited), probe.prompt
    mondrian = [p for p in first.group(SPECIFICITY, 0).probes if p.subject == "mondrian"]
    assert mondrian, "the recipe's preserved concept is a neighbour"
    held_out = ("a rendering of ", "an illustration of ")
    for probe in first.group(GENERALIZATION, 2).probes:
        assert probe.prompt.startswith(held_out)
    for probe in first.group(EFFICACY, 2).probes:
        assert not probe.prompt.startswith(held_out)
        assert probe.target_prompt.replace("a dog", "snoopy") == probe.prompt


def test_neighbours_are_probed_on_several_heldout_prompts_each():
    # One solve prompt per neighbour let 1-3 label flips of 32 images decide the gate, on the
    # very prompts compile preserved; several held-out prompts each measure the neighbours.
    from compiler.prompts import vocabulary_for
    from compiler.resolve import template_prompts
    from compiler.verify.probes import NEIGHBOUR_PROMPTS

    recipe = loads_recipe((REPO / "recipes" / "snoopy.yaml").read_text(), "snoopy.yaml")
    toy = vocabulary_for(REPO / "compiler" / "toy" / "weights" / "pipeline")
    found = {0: [("a triangle", 0.8), ("a tree", 0.73), ("a robot", 0.73)]}
    plan = plan_probes(recipe, seeds=4, vocabulary=toy, found=found)
    probes = plan.group(SPECIFICITY, 0).probes
    for neighbour in ("nemo", "a triangle", "a tree", "a robot"):
        prompts = [p.prompt for p in probes if p.subject == neighbour]
        assert len(prompts) == len(set(prompts)) == NEIGHBOUR_PROMPTS, neighbour
        assert set(prompts) <= set(template_prompts(neighbour, "object", toy, heldout=True))
        assert not set(prompts) & set(template_prompts(neighbour, "object", toy))
    # Fewer prompts per group asked for (quick runs): half as many per neighbour, at least one.
    quick = plan_probes(recipe, seeds=1, vocabulary=toy, found=found, prompts_per_group=1)
    assert len(quick.group(SPECIFICITY, 0).probes) == 4
    half = plan_probes(recipe, seeds=1, vocabulary=toy, found=found, prompts_per_group=4)
    assert len(half.group(SPECIFICITY, 0).probes) == 4 * 2


def _group(name: str, edit_index, base: float, edited: float, *, replacement=None) -> GroupResult:
    """A group of 20 images whose subject shows in ``base``/``edited`` fractions of them."""
    n = 20
    has_target = replacement is not None
    samples = []
    for i in range(n):
        def scores(rate, replacement_rate):
            return ImageScores("x", i < round(rate * n), (i < round(replacement_rate * n)) if has_target else None,
                               0.2, 0.1 if has_target else None)
        samples.append(Sample(f"p{i}", 0, "s", scores(base, replacement[0] if has_target else 0),
                              scores(edited, replacement[1] if has_target else 0), 0.1))

    def model(rate, replacement_rate):
        return ModelScores(rate, replacement_rate if has_target else None, 0.2, 0.1 if has_target else None)

    return GroupResult(name, name, edit_index, "", [f"p{i}" for i in range(n)], [0],
                       model(base, replacement[0] if has_target else None),
                       model(edited, replacement[1] if has_target else None), 0.1,
                       [SubjectScores("s", n, base, edited)], samples, np.zeros(0), np.zeros(0))


def _gates(attribute: str, efficacy: GroupResult, *, specificity=(1.0, 1.0), generic=(1.0, 1.0),
           generalization=(0.8, 0.1), **thresholds):
    recipe = loads_recipe(f"edits: [{{concept: van gogh, replacement: a painting, attribute: {attribute}}}]\n"
                          + ("verify: " + json.dumps(thresholds) + "\n" if thresholds else ""))
    groups = [efficacy, _group(GENERALIZATION, 0, *generalization, replacement=(0.0, 0.9)),
              _group(SPECIFICITY, 0, *specificity), _group(GENERIC, None, *generic)]
    return {gate.name: gate for gate in evaluate_gates(recipe, groups)}


def test_gates_pass_a_good_style_edit_and_fail_weak_or_unspecific_ones():
    good = _gates("style", _group(EFFICACY, 0, 0.75, 0.05, replacement=(0.0, 0.9)))
    assert all(not g.failed for g in good.values())
    assert good["edits[0].generalization"].skipped  # no threshold in the recipe
    weak = _gates("style", _group(EFFICACY, 0, 0.75, 0.5, replacement=(0.0, 0.4)))
    assert weak["edits[0].efficacy"].failed and "50%" in weak["edits[0].efficacy"].message
    never_seen = _gates("style", _group(EFFICACY, 0, 0.0, 0.0, replacement=(0.0, 0.0)))
    assert never_seen["edits[0].efficacy"].failed and "cannot be seen" in never_seen["edits[0].efficacy"].message
    unspecific = _gates("style", _group(EFFICACY, 0, 0.75, 0.0, replacement=(0.0, 0.9)),
                        specificity=(1.0, 0.9), generic=(1.0, 0.95))
    assert unspecific["edits[0].specificity"].failed
    assert not unspecific["generic.specificity"].failed  # a drop of exactly the allowed 5 points
    strict = _gates("style", _group(EFFICACY, 0, 0.75, 0.05, replacement=(0.0, 0.9)),
                    generalization=(0.8, 0.3), generalization_max_accuracy=0.2)
    assert strict["edits[0].generalization"].failed and not strict["edits[0].generalization"].skipped


def test_fact_gate_wants_the_replacement():
    updated = _gates("fact", _group(EFFICACY, 0, 0.9, 0.1, replacement=(0.0, 0.8)))
    assert not updated["edits[0].efficacy"].failed
    assert updated["edits[0].efficacy"].comparison == ">="
    stale = _gates("fact", _group(EFFICACY, 0, 0.9, 0.1, replacement=(0.0, 0.6)))
    assert stale["edits[0].efficacy"].failed  # below fact_min_accuracy = 0.7
    assert VerifyGates().fact_min_accuracy == 0.7


# --------------------------------------------------------------------------------------------
# A real edit on the real toy world
# --------------------------------------------------------------------------------------------

TOY_WEIGHTS_PRESENT = (PIPELINE_DIR / "model_index.json").is_file() and (JUDGE_DIR / "vision.safetensors").is_file()


# 2 seeds x 4 prompts per group (the recipes' 4 x 8 cost 4x more): the trained toy's edits pass
# or fail as clearly (measured: van gogh efficacy 0.0, the fact's 0.875, specificity drops 0).
FEWER = ["--seeds", "2", "--prompts", "4"]
needs_toy_weights = pytest.mark.skipif(
    not TOY_WEIGHTS_PRESENT, reason=f"the trained toy weights are not built ({PIPELINE_DIR.parent}); `make train-toy`")


def _compile(recipe: Path, out: Path) -> None:
    compiled = CliRunner().invoke(main, ["compile", str(recipe), "--out", str(out), "--no-verify", "--quiet"])
    assert compiled.exit_code == 0, compiled.output


@needs_toy_weights
def test_real_edit_on_the_toy_world_passes(tmp_path):
    # All 16 layers: LocoGen finds no small window on the toy world (see README), and running
    # the sweep here would cost minutes; compile's `layers: auto` falls back to the same set.
    recipe = tmp_path / "van_gogh.yaml"
    recipe.write_text(VAN_GOGH.read_text().replace("layers: auto", "layers: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]"))
    edited = tmp_path / "van_gogh"
    _compile(recipe, edited)
    result = _verify(recipe, "--edited", edited, "--report", tmp_path / "report", "--json", "--quiet", *FEWER)
    report = json.loads(result.stdout)
    assert result.exit_code == 0, [g["message"] for g in report["gates"] if g["failed"]]
    efficacy = report["edits"][0]["groups"]["efficacy"]
    assert efficacy["edited"]["accuracy"] < efficacy["base"]["accuracy"]
    assert efficacy["change"]["clip_prompt"] < 0  # the concept's CLIP-score falls
    assert (tmp_path / "report" / "report.html").is_file()


@needs_toy_weights
def test_shipped_fact_recipe_passes_on_the_toy_world(tmp_path):
    """The fact edit as shipped (Diff-QuickFix at layer 0's v_proj): king charles appears for the
    monarch and nobody else is redrawn, queen elizabeth included (LocoEdit failed exactly there)."""
    recipe = VAN_GOGH.parent / "british_monarch.yaml"
    edited = tmp_path / "fact"
    _compile(recipe, edited)
    result = _verify(recipe, "--edited", edited, "--json", "--quiet", *FEWER)
    report = json.loads(result.stdout)
    assert result.exit_code == 0, [g["message"] for g in report["gates"] if g["failed"]]
    groups = report["edits"][0]["groups"]
    assert groups["efficacy"]["base"]["replacement_accuracy"] == 0
    assert groups["efficacy"]["edited"]["replacement_accuracy"] >= 0.7
    assert groups["specificity"]["edited"]["accuracy"] >= groups["specificity"]["base"]["accuracy"] - 0.05


@pytest.mark.slow  # 22 s; the gate and exit code are tested on the quick toy above (make test)
@needs_toy_weights
def test_useless_edit_on_the_toy_world_fails(tmp_path):
    """A huge λ pins the weights to the old ones: the edit does nothing and must fail (on the
    trained toy, where the concept is really drawn before and after)."""
    recipe = tmp_path / "useless.yaml"
    recipe.write_text("model: toy\nlambda: 1000000\n"
                      "edits: [{concept: van gogh, replacement: a painting, attribute: style, method: locoedit,"
                      " layers: [2, 3, 4]}]\n")
    _compile(recipe, tmp_path / "useless")
    # Fewer images suffice to see that nothing changed.
    result = _verify(recipe, "--edited", tmp_path / "useless", "--json", "--quiet", *FEWER)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["failed_gates"] == ["edits[0].efficacy"]
    efficacy = report["edits"][0]["groups"]["efficacy"]
    assert efficacy["base"]["accuracy"] > 0.5 and efficacy["edited"]["accuracy"] > 0.5
