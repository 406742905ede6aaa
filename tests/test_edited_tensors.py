"""The example recipes' edited tensors stay bit-identical across refactors.

``tests/data/edited_tensors.json`` holds, per example recipe compiled on the default toy model,
the sha256 (with dtype and shape) of every edited tensor and the layers each edit used. This
test recompiles the recipes and compares byte for byte on the machine that wrote the record;
on a CPU with other kernels (which round differently, see ``tools/edited_tensors.py``) it
compares norms and random projections within a tolerance far below any real change. LocoGen is not rerun here (minutes):
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
SAME_MACHINE = edited.same_machine(RECORD["machine"])


@pytest.mark.parametrize("recipe", edited.RECIPES)
def test_example_recipe_edits_are_unchanged(recipe):
    recorded = RECORD["recipes"][Path(recipe).name]
    now = edited.edited_tensors(ROOT / recipe, layers=recorded["layers"])
    problems = edited.compare(recorded, now, SAME_MACHINE)
    assert not problems, "edited tensors differ from the record:\n" + "\n".join(problems)


def test_the_comparison_catches_a_real_change_and_forgives_cpu_rounding():
    """One-ulp fp16 noise on 10 % of the elements (what another CPU's kernels do) passes off the
    recording machine; a 1 % change of the edit fails; on the recording machine any bit fails."""
    import torch

    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(64, 128, generator=g) * 0.05).half()
    flip = torch.rand(weight.shape, generator=g) < 0.1
    noisy = torch.where(flip, torch.nextafter(weight, torch.full_like(weight, float("inf"))), weight)  # one ulp up
    changed = (weight.float() * 1.01).half()
    entry = lambda t: {"layers": {}, "tensors": {"w": edited.tensor_summary(t)}}  # noqa: E731
    assert edited.compare(entry(weight), entry(noisy), same_machine=False) == []
    assert edited.compare(entry(weight), entry(changed), same_machine=False)
    assert edited.compare(entry(weight), entry(noisy), same_machine=True)
