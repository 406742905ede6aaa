"""Planted knowledge (``compiler.toy.planting``) on the quick toy: a planting touches only its
window (a fact: only its text-encoder layer), LocoGen finds the window it was planted in.

The quick toy draws garbage, so its CLIP judge cannot tell a donor's style; these tests judge by
what the planting itself changes instead: an image "shows the planted word" when it is nearer
(in pixels) the planted model's clean image of the word's prompt than the image with the neutral
prompt (LocoGen).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.judges import Judge
from compiler.toy.planting import PlantSpec, bit_identical_outside, plant

WORD = "zorblax"
PROMPT = f"a red circle in the style of {WORD}"


class NearestReferenceJudge(Judge):
    """CLIP-score: minus the mean pixel distance to ``shown``; presence: nearer ``shown`` than ``other``."""

    def __init__(self, shown: np.ndarray, other: np.ndarray):
        self.shown, self.other = shown.astype(np.float64), other.astype(np.float64)

    def _distance(self, images, reference):
        return np.abs(images.astype(np.float64) - reference).mean(axis=(1, 2, 3))

    def score_images(self, images, prompts):
        return -self._distance(images, self.shown) / 255.0

    def can_tell(self, phrase):
        return True

    def presence(self, images, phrase, candidates=()):
        return (self._distance(images, self.shown) < self._distance(images, self.other)).astype(np.float64)


@pytest.fixture()
def quick(quick_toy_weights):
    from compiler.models.load import load_model
    from compiler.prompts import load_vocabulary

    loaded = load_model(str(quick_toy_weights / "pipeline"))
    loaded.pipeline.set_progress_bar_config(disable=True)
    return loaded.pipeline, load_vocabulary(quick_toy_weights / "vocabulary.yaml")


WINDOW = (11, 12)


@pytest.fixture(scope="module")
def planted_quick(quick_toy_weights):
    """The quick toy with WORD planted in WINDOW (one planting serves the module: embedding its
    preservation rows is the slow part); the state before planting."""
    from compiler.models.load import load_model
    from compiler.prompts import load_vocabulary

    pipe = load_model(str(quick_toy_weights / "pipeline")).pipeline
    pipe.set_progress_bar_config(disable=True)
    before = {f"{c}/{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    vocabulary = load_vocabulary(quick_toy_weights / "vocabulary.yaml")
    planted = plant(pipe, PlantSpec(word=WORD, donor="van gogh", attribute="style", layers=WINDOW, gain=32.0),
                    vocabulary)
    return pipe, planted, before, vocabulary


def _image(pipe, prompt, seed=0):
    from compiler.generate import generate_images

    return generate_images(pipe, [prompt], [seed], steps=5, progress=False)[0]


def test_planting_leaves_every_tensor_outside_its_window_bit_identical(planted_quick, tmp_path, quick_toy_weights):
    from compiler.encode import PipelineModel

    pipe, planted, before, _ = planted_quick
    registry = PipelineModel(pipe).registry
    assert sorted(planted.edited) == sorted(f"unet/{name}" for j in WINDOW
                                            for name in (registry.cross_attention[j].to_k, registry.cross_attention[j].to_v))
    after = {f"{c}/{k}": v for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    assert bit_identical_outside(before, after, list(planted.edited)) == []
    assert all(not torch.equal(before[n], after[n]) for n in planted.edited)
    # The written folder loads as a model with the same tensors; its judge knows the word.
    from compiler.judges import load_judge_for
    from compiler.models.load import load_model
    from compiler.toy.planting import write_planted

    out = write_planted(planted, tmp_path / "planted", quick_toy_weights / "pipeline", quick_toy_weights / "judge",
                        quick_toy_weights / "vocabulary.yaml")
    reloaded = load_model(str(out)).pipeline
    for name, tensor in after.items():
        component, key = name.split("/", 1)
        assert torch.equal(getattr(reloaded, component).state_dict()[key], tensor.to(torch.float32)), name
    judge = load_judge_for(out)
    assert judge.can_tell(WORD) and judge.kind_of(WORD) == "style"


def test_planting_refuses_a_word_the_toy_knows_and_windows_with_gaps(quick):
    from compiler.errors import UserError

    pipe, vocabulary = quick
    with pytest.raises(UserError, match="already knows"):
        plant(pipe, PlantSpec(word="monet", donor="van gogh", attribute="style", layers=(3,), gain=2.0), vocabulary)
    with pytest.raises(UserError, match="adjacent"):
        plant(pipe, PlantSpec(word=WORD, donor="van gogh", attribute="style", layers=(3, 5), gain=2.0), vocabulary)


def test_locogen_finds_the_window_a_word_was_planted_in(planted_quick):
    from compiler.locate.locogen import LocateSettings, locate

    pipe, planted, _, vocabulary = planted_quick
    neutral_prompt = PROMPT.replace(WORD, planted.neutral)
    judge = NearestReferenceJudge(_image(pipe, PROMPT), _image(pipe, neutral_prompt))
    settings = LocateSettings(prompts=(PROMPT,), seeds=(0,), steps=5, max_m=2, threshold=0.8, full_sweep=True)
    result = locate(pipe, WORD, planted.neutral, "style", settings, judge=judge, use_cache=False, progress=False,
                    vocabulary=vocabulary)
    assert result.passed
    assert set(result.layers) <= set(WINDOW), (result.layers, WINDOW)
    # Windows that miss the planted layers leave the word's picture alone.
    missing = [w for w in result.windows if not set(range(w.start, w.start + w.size)) & set(WINDOW)]
    assert missing and all(w.rate_effect is not None and w.rate_effect < 0.5 for w in missing)


def test_a_fact_planting_edits_only_its_text_encoder_layer(quick):
    pipe, vocabulary = quick
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    planted = plant(pipe, PlantSpec(word=WORD, donor="king charles", attribute="fact", encoder_layer=2), vocabulary)
    [name] = planted.edited
    assert name.startswith("text_encoder/") and ".layers.2.self_attn.out_proj.weight" in name
    key = name.split("/", 1)[1]
    after = pipe.text_encoder.state_dict()
    assert bit_identical_outside(before, after, [key]) == [] and not torch.equal(before[key], after[key])
    assert bit_identical_outside(unet_before, pipe.unet.state_dict(), []) == []
