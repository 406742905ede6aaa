"""LocoGen on a quickly trained toy model (garbage pictures, exact SD-1.5 structure): the
per-sample routing is exact, the sweep's result has its schema, the cache answers without
generating, and the CLI's exit codes hold."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compiler.errors import UserError
from compiler.locate import LocateSettings, generate_with_windows, locate, write_outputs
from compiler.locate import locogen, routing
from compiler.locate.engine import GenerationSettings
from compiler.locate.routing import ContextRouting, cross_attention_modules
from compiler.models.families import LayerWindow

PROMPTS = ["a red house in the style of van gogh", "a blue star in the style of van gogh"]
ALTERNATIVES = [p.replace("van gogh", "a painting") for p in PROMPTS]
FAST = GenerationSettings(steps=2, guidance=4.0, batch=8)


@pytest.fixture(scope="module")
def toy(quick_toy_weights):
    from compiler.models.load import load_model
    from compiler.toy.judge import load_judge

    weights = quick_toy_weights
    loaded = load_model(str(weights / "pipeline"))
    loaded.pipeline.set_progress_bar_config(disable=True)
    return loaded, load_judge(weights / "pipeline", weights / "judge")


# ----------------------------------------------------------------------------- routing
def test_routing_swaps_only_masked_conditional_rows():
    routing = ContextRouting()
    uncond, cond, alt = torch.zeros(3, 4, 2), torch.ones(3, 4, 2), torch.full((3, 4, 2), 7.0)
    routing.set(alt, torch.tensor([[True, False], [False, False], [True, True]]))
    routed = routing.route(0, torch.cat([uncond, cond]))  # CFG: [unconditional, conditional]
    assert torch.equal(routed[:3], uncond)  # the unconditional half is never touched
    assert torch.equal(routed[3:], torch.stack([alt[0], cond[1], alt[2]]))
    assert torch.equal(routing.route(1, cond)[2], alt[2])  # no CFG: all rows are conditional
    assert torch.equal(routing.route(1, cond)[:2], cond[:2])
    routing.clear()
    assert torch.equal(routing.route(0, cond), cond)


def test_layers_in_papers_order_match_the_registry(toy):
    loaded, _ = toy
    names = [layer.name for layer in cross_attention_modules(loaded.pipeline.unet)]
    assert names == [layer.module_name for layer in loaded.registry.cross_attention]
    assert len(names) == 16 and names[6].startswith("mid_block")


def test_window_covering_no_layer_reproduces_clean_images_exactly(toy):
    from compiler.generate import generate_images

    pipe = toy[0].pipeline
    clean = generate_images(pipe, PROMPTS, [0, 1], steps=FAST.steps, guidance=FAST.guidance, progress=False)
    routed = generate_with_windows(pipe, PROMPTS, ALTERNATIVES, [0, 1], [None, None], FAST)
    assert np.array_equal(clean, routed)
    windowed = generate_with_windows(pipe, PROMPTS, ALTERNATIVES, [0, 1], [LayerWindow(0, 16)] * 2, FAST)
    assert not np.array_equal(clean, windowed)  # c' everywhere does change the pictures
    # The processors are removed afterwards: the plain pipeline is unchanged.
    again = generate_images(pipe, PROMPTS, [0, 1], steps=FAST.steps, guidance=FAST.guidance, progress=False)
    assert np.array_equal(clean, again)


def test_per_sample_routing_equals_each_window_alone(toy):
    pipe = toy[0].pipeline
    first, second = LayerWindow(2, 3), LayerWindow(9, 2)
    # Same batch shape throughout, so any difference comes from routing, not from batching.
    mixed = generate_with_windows(pipe, PROMPTS, ALTERNATIVES, [0, 1], [first, second], FAST)
    only_first = generate_with_windows(pipe, PROMPTS, ALTERNATIVES, [0, 1], [first, first], FAST)
    only_second = generate_with_windows(pipe, PROMPTS, ALTERNATIVES, [0, 1], [second, second], FAST)
    assert np.array_equal(mixed[0], only_first[0])
    assert np.array_equal(mixed[1], only_second[1])
    assert not np.array_equal(only_first[1], only_second[1])


def test_sweep_prompts_pair_each_prompt_with_its_replacement():
    originals, alternatives = locogen.sweep_prompts("Van Gogh", "a painting", "style",
                                                    ["a cat in the style of van gogh"])
    assert (originals, alternatives) == (["a cat in the style of van gogh"], ["a cat in the style of a painting"])
    originals, alternatives = locogen.sweep_prompts("the british monarch", "king charles", "fact", n_prompts=5)
    assert len(originals) == 5 and len(set(originals)) == 5
    assert all(o.replace("the british monarch", "king charles") == a for o, a in zip(originals, alternatives))


def test_sdxl_routing_covers_70_layers_and_keeps_clean_images(tiny):
    """SD-XL's two encoders and pooled embeddings go through the same routed generation."""
    from compiler.generate import generate_images
    from compiler.models.load import load_model

    loaded = load_model(str(tiny("sdxl")))
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    names = [layer.name for layer in cross_attention_modules(pipe.unet)]
    assert len(names) == 70 and names == [layer.module_name for layer in loaded.registry.cross_attention]
    settings = GenerationSettings(steps=1, height=64, width=64)
    clean = generate_images(pipe, PROMPTS, [0, 1], steps=1, height=64, width=64, progress=False)
    routed = generate_with_windows(pipe, PROMPTS, ALTERNATIVES, [0, 1], [None, LayerWindow(45, 3)], settings)
    assert np.array_equal(clean[0], routed[0])


# ----------------------------------------------------------------------------- choosing
def _score(start, size, rate, clip, passed):
    return locogen.WindowScore(start, size, clip, rate, None, 1.0 - rate, passed)


def test_smallest_passing_size_wins_and_ties_break_on_clip():
    scores = [_score(0, 1, 0.9, 0.30, False), _score(1, 1, 0.8, 0.29, False),
              _score(0, 2, 0.1, 0.25, True), _score(1, 2, 0.1, 0.20, True), _score(0, 3, 0.0, 0.1, True)]
    best, passed = locogen.choose_window(scores, "accuracy", higher_is_better=False)
    assert passed and (best.start, best.size) == (1, 2)
    nothing = [_score(0, 1, 0.9, 0.3, False), _score(0, 2, 0.4, 0.3, False), _score(1, 2, 0.6, 0.3, False)]
    best, passed = locogen.choose_window(nothing, "accuracy", higher_is_better=False)
    assert not passed and (best.start, best.size) == (0, 2)  # the strongest effect
    tied = [locogen.WindowScore(3, 1, 0.7, 0.75, 0.1, 0.25, False),
            locogen.WindowScore(1, 3, 0.6, 0.75, 0.7, 0.25, False)]
    best, _ = locogen.choose_window(tied, "accuracy", higher_is_better=False)
    assert (best.start, best.size) == (1, 3)  # equal rates: the larger CLIP effect decides
    facts = [_score(0, 1, 0.2, 0.3, True), _score(1, 1, 0.9, 0.3, True)]
    best, _ = locogen.choose_window(facts, "accuracy", higher_is_better=True)
    assert best.start == 1


def test_sweep_stops_at_the_first_passing_size_unless_full(toy, monkeypatch):
    """Scores faked per window (only layers 5-6 hold the concept): the sweep's bookkeeping."""
    loaded = toy[0]

    def fake_run(pipe, samples, local, masks, *args, keep_windows, **kwargs):
        holds = torch.zeros(16, dtype=torch.bool)
        holds[5:7] = True
        clip = {k: 0.0 if bool((masks[samples[k][0]] & holds).sum() == 2) else 1.0 for k in local}
        kept = {k: np.zeros((4, 4, 3), np.uint8) for k in local if samples[k][0] in keep_windows}
        return clip, {k: math.nan for k in local}, kept

    class ClipOnlyJudge:
        def clip_scores(self, images, prompts):
            raise AssertionError("not called: the sweep is faked")

    monkeypatch.setattr(locogen, "run_routed", fake_run)
    kwargs = dict(judge=ClipOnlyJudge(), model_hash="f" * 64, use_cache=False, progress=False)
    early = locate(toy[0].pipeline, "van gogh", "a painting", "style", LocateSettings(n_prompts=1), **kwargs)
    assert (early.best_start, early.best_size, early.passed) == (5, 2, True)
    assert early.settings.criterion == "clip" and early.window_score(5, 2).clip_effect == 1.0
    assert sorted({w.size for w in early.windows}) == [1, 2]  # m = 3 was never generated
    full = locate(toy[0].pipeline, "van gogh", "a painting", "style", LocateSettings(n_prompts=1, full_sweep=True),
                  **kwargs)
    assert (full.best_start, full.best_size) == (5, 2) and len(full.windows) == 16 + 15 + 14
    assert full.window_score(4, 3).passed and loaded.model_hash != full.model_hash


# ----------------------------------------------------------------------------- the sweep
def test_locate_result_schema_cache_hit_and_outputs(toy, tmp_path, monkeypatch):
    loaded, judge = toy
    settings = LocateSettings(n_prompts=1, steps=1, max_m=2, batch=16)
    kwargs = dict(judge=judge, model_hash=loaded.model_hash, progress=False)
    result = locate(loaded.pipeline, "van gogh", "a painting", "style", settings, **kwargs)
    payload = json.loads(result.to_json())
    assert payload["kind"] == "locogen" and payload["num_layers"] == 16
    assert len(payload["windows"]) == 16 + 15
    assert {"start", "size", "clip", "rate", "clip_effect", "rate_effect", "passed"} == set(payload["windows"][0])
    assert payload["criterion"] == "accuracy"  # the toy judge can tell whether van gogh is there
    assert payload["best"]["layers"] == list(range(result.best_start, result.best_start + result.best_size))
    assert payload["settings"]["prompts"] == ["a red circle in the style of van gogh"]
    assert payload["settings"]["alternative_prompts"] == ["a red circle in the style of a painting"]
    assert payload["timings"]["samples"] == 16 + 15 + 2
    assert result.images["clean"].shape == result.images["best"].shape == (1, 32, 32, 3)

    def no_generation(*args, **kwargs):
        raise AssertionError("a cache hit must not generate")

    monkeypatch.setattr(routing, "generate_from_embeddings", no_generation)
    again = locate(loaded.pipeline, "van gogh", "a painting", "style", settings, **kwargs)
    assert again.cached and not result.cached
    assert {**again.to_dict(), "cached": False} == result.to_dict()
    assert np.array_equal(again.images["best"], result.images["best"])
    with pytest.raises(AssertionError, match="cache hit"):  # other settings: another entry
        locate(loaded.pipeline, "van gogh", "a painting", "style", replace(settings, steps=2), **kwargs)
    # compile takes only the sweep it would run itself (COMPILE_SWEEP's settings), never an
    # earlier one with other settings: what it writes must not depend on this machine's cache.
    with pytest.raises(AssertionError, match="cache hit"):
        locogen.locate_cached(loaded, "van gogh", "a painting", "style", judge=judge)
    with pytest.raises(AssertionError, match="cache hit"):
        locogen.locate_cached(loaded, "van gogh", "an oil painting", "style", judge=judge)

    written = write_outputs(again, tmp_path)
    from PIL import Image

    assert sorted(p.name for p in written) == ["grid.png", "heatmap.png", "locate.json"]
    assert Image.open(tmp_path / "heatmap.png").size[0] > 16 * 30
    assert json.loads((tmp_path / "locate.json").read_text())["best"] == payload["best"]


def test_confirmation_at_full_settings_measures_the_winner_again(toy):
    loaded, judge = toy
    settings = LocateSettings(n_prompts=1, steps=1, max_m=1, height=16, width=16, confirm_steps=2)
    result = locate(loaded.pipeline, "snoopy", "a dog", "object", settings, judge=judge,
                    model_hash=loaded.model_hash, use_cache=False, progress=False)
    assert result.settings.height == 16 and result.confirmation.steps == 2
    assert (result.confirmation.best.start, result.confirmation.best.size) == (result.best_start, result.best_size)
    assert result.images["best"].shape == (1, 32, 32, 3)  # the grid shows full-resolution images
    assert json.loads(result.to_json())["confirmation"]["best"]["start"] == result.best_start


def test_locate_rejects_bad_input_before_generating(toy):
    loaded, judge = toy
    with pytest.raises(UserError, match="max-m"):
        locate(loaded.pipeline, "van gogh", "a painting", "style", LocateSettings(max_m=17), judge=judge)
    with pytest.raises(UserError, match="does not contain"):
        locate(loaded.pipeline, "van gogh", "a painting", "style", LocateSettings(prompts=("a red house",)),
               judge=judge)
    with pytest.raises(UserError, match="attribute"):
        locate(loaded.pipeline, "van gogh", "a painting", "colour", judge=judge)


def test_sharded_samples_merge_to_the_single_process_result(toy):
    """What torch.distributed ranks compute, run here one rank after the other."""
    from compiler.locate.distributed import ProcessGroup
    from compiler.locate.engine import embed_prompts, embed_unconditional

    pipe, judge = toy[0].pipeline, toy[1]
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[1, 4:7] = True
    masks[2] = True
    samples = [(w, p, 0) for w in range(3) for p in range(2)]
    args = (masks, embed_prompts(pipe, PROMPTS), embed_prompts(pipe, ALTERNATIVES), embed_unconditional(pipe),
            PROMPTS, judge, "van gogh", FAST)

    def run(group):
        return routing.run_routed(pipe, samples, group.shard(len(samples)), *args, keep_windows={0},
                                   progress=False, desc="")

    single = routing.merge_ranks(ProcessGroup(0, 1), len(samples), *run(ProcessGroup(0, 1)))
    parts = [run(ProcessGroup(rank, 2)) for rank in range(2)]
    assert sorted(k for part in parts for k in part[0]) == list(range(len(samples)))

    class TwoRanks(ProcessGroup):
        def gather(self, payload):
            return parts

    sharded = routing.merge_ranks(TwoRanks(0, 2), len(samples), *parts[0])
    np.testing.assert_allclose(sharded[0], single[0], atol=2e-3)  # batches differ: float noise
    assert sorted(sharded[2]) == sorted(single[2]) == [0, 1]


def _floats(value) -> list[float]:
    """Every non-integral float in a JSON value, in order."""
    if isinstance(value, dict):
        return [f for k in sorted(value) for f in _floats(value[k])]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return [value] if isinstance(value, float) and not value.is_integer() else []


def _without_floats(value):
    """The JSON value with its non-integral floats replaced by a marker: everything else compared exactly."""
    if isinstance(value, dict):
        return {k: _without_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_floats(v) for v in value]
    return "<float>" if isinstance(value, float) and not value.is_integer() else value


def test_torchrun_two_processes_locate_what_one_process_locates(quick_toy, tmp_path):
    """A real ``torchrun --nproc-per-node 2`` (gloo, CPU) sweep gives the one-process result.

    One sample per pipeline call (``--batch 1``) and one thread per process, so every image is
    computed exactly as in the single process: the images are equal bit for bit. The judge scores
    each rank's share in one batch, and some CPUs' matrix kernels round differently for another
    batch size (an H200 machine's 16-core CPU: up to 4e-5 relative in a CLIP score), so scores agree to 1e-4 and every
    decision (windows, rates, the best window) exactly."""
    import os
    import subprocess
    import sys

    from compiler.cli import main

    args = ["locate", "--model", str(quick_toy), "--concept", "van gogh", "--replacement", "a painting",
            "--attribute", "style", "--steps", "2", "--prompts", "1", "--max-m", "1", "--batch", "1", "--no-cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "compiler.cli", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    two_result = json.loads((tmp_path / "two" / "locate.json").read_text())
    one_result = json.loads((tmp_path / "one" / "locate.json").read_text())
    assert (two_result["timings"]["processes"], one_result["timings"]["processes"]) == (2, 1)
    assert two_result["timings"]["samples"] == one_result["timings"]["samples"] == 16 + 2
    assert _without_floats({**two_result, "timings": None}) == _without_floats({**one_result, "timings": None})
    assert _floats(two_result["windows"]) == pytest.approx(_floats(one_result["windows"]), rel=1e-4, abs=1e-6)
    assert (tmp_path / "two" / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()


# ----------------------------------------------------------------------------- CLI
def test_cli_locate_json_files_and_exit_codes(toy, tmp_path, quick_toy):
    from compiler.cli import main

    pipeline = quick_toy
    out = tmp_path / "loc"
    args = ["locate", "--model", str(pipeline), "--concept", "snoopy", "--replacement", "a dog",
            "--attribute", "object", "--steps", "1", "--prompts", "1", "--max-m", "1", "--out", str(out)]
    runner = CliRunner()
    ok = runner.invoke(main, [*args, "--json"])
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert payload["attribute"] == "object" and payload["judged_phrase"] == "snoopy"
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "heatmap.png", "locate.json"]

    exists = runner.invoke(main, args)  # never overwrite without --force
    assert exists.exit_code == 2 and "already exists" in exists.stderr
    assert len(exists.stderr.strip().splitlines()) == 1
    forced = runner.invoke(main, [*args, "--force"])
    assert forced.exit_code == 0 and "window j=" in forced.stdout and "cached" in forced.stdout

    bad_seeds = runner.invoke(main, [*args, "--force", "--seeds", "x"])
    assert bad_seeds.exit_code == 2 and "--seeds" in bad_seeds.stderr
    bad_attribute = runner.invoke(main, [*args[:-2], "--attribute", "colour"])
    assert bad_attribute.exit_code == 2
