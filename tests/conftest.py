"""Shared, session-scoped fixtures: the quick toy model and tiny checkpoints, each built once
per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing may ever be downloaded from a model hub, in tests least of all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
