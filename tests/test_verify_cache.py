"""Verify keeps the base model's images and judgements in the editc cache: a second verify
against the same base generates only the edited model's images and says so; ``--no-cache``
skips the cache; anything that decides the base images (base, judge, settings) misses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compiler.cli import main
from compiler.verify.base_cache import CACHED, GENERATED, NOT_CACHED, BaseImageCache, judge_identity

# One seed, one step, one prompt per group, no found neighbours: the cheapest verify that
# still runs every stage.
CHEAP = ["--seeds", "1", "--steps", "1", "--prompts", "1", "--quiet", "--json"]


@pytest.fixture(scope="module")
def setup(quick_toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-cache")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {quick_toy}\nneighbours: 0\nedits:\n  - concept: van gogh\n"
                      f"    replacement: a painting\n    attribute: style\n")
    edited = Path(shutil.copytree(quick_toy, root / "edited"))
    return SimpleNamespace(root=root, recipe=recipe, edited=edited, base=quick_toy, cache=root / "cache")


def _verify(setup, monkeypatch, *extra) -> dict:
    monkeypatch.setenv("EDITC_CACHE_DIR", str(setup.cache))
    result = CliRunner().invoke(main, ["verify", str(setup.recipe), "--edited", str(setup.edited),
                                       "--base", str(setup.base), *CHEAP, *map(str, extra)])
    assert result.exit_code in (0, 1), (result.output, result.exception)
    return json.loads(result.stdout)


def test_a_second_verify_takes_the_base_images_from_the_cache(setup, monkeypatch, tmp_path):
    uncached = _verify(setup, monkeypatch, "--no-cache")  # neither reads nor writes the cache
    assert uncached["base"] == NOT_CACHED and "generate_base" in uncached["timings_seconds"]
    assert not list(setup.cache.glob("verify-base/*/*"))
    first = _verify(setup, monkeypatch)
    assert first["base"] == GENERATED and "generate_base" in first["timings_seconds"]
    assert len(list(setup.cache.glob("verify-base/*/*/images.npz"))) == 1
    import compiler.verify.run as verify_run

    loaded_roles = []
    real_load = verify_run.load_pipeline
    monkeypatch.setattr(verify_run, "load_pipeline",
                        lambda spec, role, device: loaded_roles.append(role) or real_load(spec, role, device))
    second = _verify(setup, monkeypatch, "--report", tmp_path / "report")
    assert second["base"] == CACHED and "generate_base" not in second["timings_seconds"]
    assert loaded_roles == ["edited"]  # the cached base is never loaded
    assert "base: cached" in (tmp_path / "report" / "report.html").read_text()
    assert json.loads((tmp_path / "report" / "verify.json").read_text())["base"] == CACHED
    # The cached judgements are the very ones the other runs made.
    for other in (uncached, first):
        assert [g["value"] for g in second["gates"]] == [g["value"] for g in other["gates"]]
        assert second["edits"] == other["edits"] and second["generic"] == other["generic"]


def test_a_damaged_entry_reads_as_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITC_CACHE_DIR", str(tmp_path))
    from compiler.verify.metrics import ImageSet, ModelView

    cache = BaseImageCache.for_run(base_sha256="a" * 64, judge={"kind": "J"}, keys=[("a red circle", 0)], steps=1,
                                   guidance=4.0, batch=64, candidates={"style": ("monet",)}, pipe=_fake_pipe())
    view = ModelView(ImageSet([("a red circle", 0)], np.zeros((1, 4, 4, 3), np.uint8)), torch.ones(1, 8),
                     {"style": ["monet"], "subject": ["circle"]})
    cache.save(view)
    again = cache.load()
    assert again is not None and again.labels == view.labels and torch.equal(again.features, view.features)
    (cache.folder / "images.npz").write_bytes(b"not an archive")
    assert cache.load() is None


def _fake_pipe(steps_offset: int = 1, sample_size: int = 8, dtype=torch.float32):
    config = {"num_train_timesteps": 1000, "steps_offset": steps_offset, "_class_name": "DDIMScheduler"}
    unet = SimpleNamespace(config=SimpleNamespace(sample_size=sample_size), dtype=dtype, device=torch.device("cpu"))
    return SimpleNamespace(unet=unet, scheduler=SimpleNamespace(config=config), vae_scale_factor=4)


def test_whatever_decides_the_base_images_is_in_the_key(quick_toy_weights, tmp_path):
    judge_dir = quick_toy_weights / "judge"
    judge = SimpleNamespace(description="toy judge")
    run = dict(base_sha256="a" * 64, judge=judge_identity(judge, judge_dir), keys=[("a red circle", 0)],
               steps=2, guidance=4.0, batch=64, candidates={"style": ("van gogh", "monet")})
    reference = BaseImageCache.for_run(**run, pipe=_fake_pipe()).folder

    other_judge = Path(shutil.copytree(judge_dir, tmp_path / "judge"))
    config = json.loads((other_judge / "config.json").read_text())
    (other_judge / "config.json").write_text(json.dumps({**config, "changed": True}))
    variants = {
        "base": {**run, "base_sha256": "b" * 64},
        "judge": {**run, "judge": judge_identity(judge, other_judge)},
        "prompts": {**run, "keys": [("a blue circle", 0)]},
        "seeds": {**run, "keys": [("a red circle", 1)]},
        "steps": {**run, "steps": 3},
        "guidance": {**run, "guidance": 7.5},
        "candidates": {**run, "candidates": {"style": ("van gogh",)}},
    }
    folders = {name: BaseImageCache.for_run(**fields, pipe=_fake_pipe()).folder for name, fields in variants.items()}
    folders["scheduler"] = BaseImageCache.for_run(**run, pipe=_fake_pipe(steps_offset=0)).folder
    folders["resolution"] = BaseImageCache.for_run(**run, pipe=_fake_pipe(sample_size=16)).folder
    folders["dtype"] = BaseImageCache.for_run(**run, pipe=_fake_pipe(dtype=torch.float16)).folder
    assert all(folder != reference for folder in folders.values()), [n for n, f in folders.items() if f == reference]
    assert BaseImageCache.for_run(**run, pipe=_fake_pipe()).folder == reference  # and stable


@pytest.mark.parametrize("family", ["toy", "sd1", "sdxl", "sd1-single-file"])
def test_settings_from_configs_equal_the_loaded_pipelines(family, quick_toy, tiny):
    """The cache key a verify computes before loading the base equals the loaded pipeline's
    (else a cached base would be loaded anyway); a single file says None: it is loaded."""
    from compiler.device import device_policy
    from compiler.models.load import inspect_source, load_for_generation
    from compiler.verify.base_cache import pipeline_settings, settings_from_source

    path = {"toy": quick_toy, "sd1": None, "sdxl": None}.get(family) or (
        tiny("sd1", "single-file") if family == "sd1-single-file" else tiny(family))
    policy = device_policy("cpu")
    settings = settings_from_source(inspect_source(str(path)), policy)
    if family == "sd1-single-file":
        assert settings is None
        return
    assert settings == pipeline_settings(load_for_generation(str(path), device=policy).pipeline)
