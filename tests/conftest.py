"""Shared, session-scoped fixtures: the quick toy model and tiny checkpoints, each built once
per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing may ever be downloaded from a model hub, in tests least of all.
import compiler  # noqa: E402,F401  (sets the offline hub variables: compiler.OFFLINE_ENV)
# Tests say which device they test: every test runs on the CPU (its results are the record's)
# unless it asks for the GPU itself (``@pytest.mark.gpu`` and ``--device cuda``/``device=``),
# so that a GPU machine runs the same suite and the GPU tests besides. ``EDITC_TEST_DEVICE``
# overrides it for a whole run.
os.environ["EDITC_DEVICE"] = os.environ.get("EDITC_TEST_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where torch sees none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_editc_cache(tmp_path_factory):
    """Keep the tests' hash/locate caches out of the user's ~/.cache/editc."""
    old = os.environ.get("EDITC_CACHE_DIR")
    os.environ["EDITC_CACHE_DIR"] = str(tmp_path_factory.mktemp("editc-cache"))
    yield
    if old is None:
        os.environ.pop("EDITC_CACHE_DIR", None)
    else:
        os.environ["EDITC_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(family, fmt="diffusers", suffix=".safetensors") -> Path``: a tiny random checkpoint
    from ``compiler.testing.tiny`` (seed 0), written on first use and shared by the session.
    Treat it as read-only; copy it before modifying."""
    from compiler.testing.tiny import write_tiny

    root = tmp_path_factory.mktemp("tiny")
    made: dict[tuple[str, str, str], Path] = {}

    def get(family: str, fmt: str = "diffusers", suffix: str = ".safetensors") -> Path:
        key = (family, fmt, suffix if fmt == "single-file" else "")
        if key not in made:
            name = family if fmt == "diffusers" else family + suffix
            made[key] = write_tiny(family, fmt, root / name)
        return made[key]

    return get


@pytest.fixture(scope="session")
def quick_toy_weights(tmp_path_factory) -> Path:
    """The toy model trained for a few steps (``compiler.toy.train --quick``): the trained toy's
    exact structure, garbage pictures. ``pipeline/`` is a diffusers folder, ``judge/`` its CLIP
    judge. Trained once per session (in a process of its own: training seeds torch's global
    generator) and shared by every test module; treat it as read-only, copy it to modify it."""
    work = tmp_path_factory.mktemp("quick-toy")
    subprocess.run([sys.executable, "-m", "compiler.toy.train", "--quick", "--workdir", str(work / "train"),
                    "--out", str(work / "weights")], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return work / "weights"


@pytest.fixture(scope="session")
def quick_toy(quick_toy_weights) -> Path:
    """The quick toy model's diffusers folder (read-only)."""
    return quick_toy_weights / "pipeline"
