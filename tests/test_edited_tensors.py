"""The example recipes' edited tensors stay bit-identical across refactors.

``tests/data/edited_tensors.json`` holds, per example recipe compiled on the default toy model,
the sha256 (with dtype and shape) of every edited tensor and the layers each edit used. This
test recompiles the recipes and compares byte for byte. LocoGen is not rerun here (minutes):
edits with ``layers: auto`` are pinned to the recorded layers; ``tools/edited_tensors.py
--check`` reruns everything, LocoGen included.

When a change alters the edits on purpose, regenerate the record with ONE command and say so
(with the measured effect) in the commit::

    PYTHONPATH=. python tools/edited_tensors.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("edited_tensors", ROOT / "tools" / "edited_tensors.py")
edited = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(edited)

RECORD = json.loads(edited.RECORD.read_text())


@pytest.mark.parametrize("recipe", edited.RECIPES)
def test_example_recipe_edits_are_bit_identical(recipe):
    recorded = RECORD[Path(recipe).name]
    now = edited.edited_tensors(ROOT / recipe, layers=recorded["layers"])
    assert sorted(now["tensors"]) == sorted(recorded["tensors"]), "a different set of tensors was edited"
    changed = [name for name, digest in now["tensors"].items() if recorded["tensors"][name] != digest]
    assert not changed, f"edited tensors differ from the record: {changed}"
    assert now["layers"] == recorded["layers"]
