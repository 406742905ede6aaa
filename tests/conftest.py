"""Shared, session-scoped fixtures: tiny checkpoints written once per test session."""

from __future__ import annotations

import os
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
