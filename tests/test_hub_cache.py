"""Models as the Hugging Face hub client stores them: cache folders and repo ids, offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.models.load import inspect_source, load_model, source_hash


def _as_hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """Lay ``folder`` out as huggingface_hub does: blobs named by content, snapshot symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from compiler.testing.tiny import write_tiny

    work = tmp_path_factory.mktemp("hub")
    write_tiny("sd1", "diffusers", work / "plain")
    repo = _as_hub_cache(work / "plain", work / "cache", "tiny-org/tiny-sd1")
    return work / "plain", repo, work / "cache"


def test_a_cache_folder_loads_with_the_hash_of_the_same_files(hub):
    plain, repo, _ = hub
    source = inspect_source(str(repo))
    assert source.path == next((repo / "snapshots").iterdir())
    assert source.family == "sd1"
    # content-true: symlinks into blobs/ hash like the files they point to, named as listed
    assert source_hash(source) == source_hash(inspect_source(str(plain)))
    snapshot_files = [p for p in source.path.rglob("*.safetensors")]
    assert snapshot_files and all(p.is_symlink() for p in snapshot_files)


def test_a_repo_id_resolves_from_the_local_cache_offline(hub, monkeypatch):
    plain, repo, cache = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = load_model("tiny-org/tiny-sd1")
    assert loaded.family == "sd1" and loaded.source_path.parent.parent == repo
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent / "home"))
    shutil.copytree(cache, cache.parent / "home" / "hub", symlinks=True)
    assert inspect_source("tiny-org/tiny-sd1").family == "sd1"


def test_a_repo_id_missing_from_the_cache_exits_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["inspect", "nobody/no-such-model"])
    assert result.exit_code == 2
    assert "not in the local Hugging Face cache" in result.output and "Traceback" not in result.output
