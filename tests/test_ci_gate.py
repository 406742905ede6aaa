"""``examples/ci/gate.sh`` on the toy world: its exit code is editc's (0 passed, 1 a gate
failed, 2 bad input), and the reports are kept as artifacts. The CI examples call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compiler.toy import JUDGE_DIR, PIPELINE_DIR

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "examples" / "ci" / "gate.sh"
ARTIFACTS = ("manifest.json", "report.html", "junit.xml", "verify.json")


def _gate(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    # This checkout's editc (not an installed one), the session's isolated cache.
    env = {**os.environ, "EDITC": f"{sys.executable} -m compiler.cli", "EDITC_GATE_OUT": str(tmp_path / "gate"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run(["bash", str(GATE), *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def _artifacts(tmp_path: Path) -> list[str]:
    folder = tmp_path / "gate" / "artifacts"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _cheap_recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return path


@pytest.mark.skipif(not (PIPELINE_DIR / "model_index.json").is_file() or not (JUDGE_DIR / "vision.safetensors").is_file(),
                    reason="the trained toy weights are not built; `make train-toy`")
def test_a_passing_recipe_exits_0_and_keeps_its_reports(tmp_path):
    # The shipped fact edit on the trained toy, verified on 1 seed x 8 prompts at 8 steps (it
    # measured 0.75 there; the gate asks 0.5, the bar for so few images).
    recipe = _cheap_recipe(tmp_path, """
neighbours: 0
edits: [{concept: the british monarch, replacement: king charles, attribute: fact, method: quickfix, site: v_proj}]
verify: {seeds: 1, steps: 8, fact_min_accuracy: 0.5, specificity_max_drop: 0.25}
""")
    result = _gate(tmp_path, recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "editc gate: PASSED: every gate passed (exit 0)"
    assert _artifacts(tmp_path) == sorted(ARTIFACTS)
    manifest = json.loads((tmp_path / "gate" / "artifacts" / "manifest.json").read_text())
    assert manifest["verify"]["passed"] is True


def test_a_failing_gate_exits_1_and_keeps_its_reports(quick_toy, tmp_path):
    # The quick toy draws noise: the judge cannot see van gogh go, so efficacy fails.
    recipe = _cheap_recipe(tmp_path, """
neighbours: 0
edits:
  - concept: van gogh
    replacement: a painting
    attribute: style
    layers: [0]
verify:
  seeds: 1
  steps: 1
""")
    result = _gate(tmp_path, recipe, quick_toy)  # MODEL overrides the recipe's (the toy)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "edits[0].efficacy" in result.stderr and "FAILED" in result.stderr.strip().splitlines()[-1]
    assert _artifacts(tmp_path) == sorted(ARTIFACTS)
    assert json.loads((tmp_path / "gate" / "artifacts" / "manifest.json").read_text())["base_model"]["path"] == str(quick_toy)


def test_a_broken_recipe_exits_2_and_says_which_field(tmp_path):
    recipe = _cheap_recipe(tmp_path, "edits:\n  - concept: van gogh\n    replacement: a painting\n    attribute: colour\n")
    result = _gate(tmp_path, recipe)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("editc: error: ") and "edits[0].attribute" in lines[0] and len(lines) == 2
    assert "Traceback" not in result.stderr and _artifacts(tmp_path) == []
    assert _gate(tmp_path).returncode == 2  # no recipe at all: a usage error, also 2


@pytest.mark.parametrize("example", ["github-actions.yml", "gitlab-ci.yml"])
def test_the_ci_examples_run_the_gate_and_keep_the_reports(example):
    text = (REPO / "examples" / "ci" / example).read_text()
    yaml.safe_load(text)  # valid YAML
    assert 'examples/ci/gate.sh "$RECIPE" "$CANDIDATE"' in text
    assert "EDITC_CACHE_DIR" in text and ".editc-cache" in text
    for artifact in ("report.html", "junit.xml", "manifest.json"):
        assert f"editc-gate/artifacts/{artifact}" in text
