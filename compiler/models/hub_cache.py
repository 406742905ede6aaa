"""Models as the Hugging Face hub client stores them, resolved offline.

A cache folder ``models--org--name`` holds ``refs/<branch>`` (a revision hash), ``snapshots/<rev>/``
(the repository's files, each a symlink into ``blobs/``) and ``blobs/``. editc reads a snapshot
as a diffusers folder (or the single file inside it). A repo id ``org/name`` is looked up in the
local cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``); nothing
is ever downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from compiler.errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories (its own precedence)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "huggingface" / "hub"


def is_cache_repo_folder(path: Path) -> bool:
    """A ``models--org--name`` folder (not one of its snapshots)."""
    return path.is_dir() and (path / "snapshots").is_dir() and path.name.startswith("models--")


def snapshot_of(repo_folder: Path, revision: str = "main") -> Path:
    """The snapshot ``refs/<revision>`` points to, else the only snapshot there is."""
    snapshots = repo_folder / "snapshots"
    ref = repo_folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
    if (snapshots / revision).is_dir():
        return snapshots / revision
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    names = ", ".join(p.name[:12] for p in found) or "none"
    raise UserError(f"{repo_folder}: no snapshot for revision '{revision}' (snapshots: {names}); "
                    f"pass the snapshot folder {snapshots}/<revision>")


def _single_file_or_folder(snapshot: Path) -> Path:
    """A snapshot with a model_index.json is a diffusers folder; one that holds exactly one
    .safetensors file at its top (a single-file repository) is that file."""
    if (snapshot / "model_index.json").is_file():
        return snapshot
    files = sorted(p for p in snapshot.iterdir() if p.suffix in (".safetensors", ".ckpt") and p.is_file())
    return files[0] if len(files) == 1 else snapshot


def resolve_hub_model(path_or_id: str | os.PathLike) -> Path | None:
    """A cache folder or repo id as the path editc loads, else None (not a hub reference).

    ``models--org--name`` -> its ``main`` snapshot; ``org/name`` (not a path on disk) -> the same
    from the local cache, or exit 2 when it is not there.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return _single_file_or_folder(snapshot_of(path)) if is_cache_repo_folder(path) else None
    text = os.fspath(path_or_id)
    revision = "main"
    if "@" in text:
        text, revision = text.rsplit("@", 1)
    if not _REPO_ID.match(text):
        return None
    cache = hub_cache_dir()
    repo_folder = cache / ("models--" + text.replace("/", "--"))
    if not is_cache_repo_folder(repo_folder):
        raise UserError(f"{text}: not a file or folder, and not in the local Hugging Face cache "
                        f"({repo_folder} does not exist); editc never downloads: fetch it with "
                        f"`huggingface-cli download {text}` where there is a network, or set "
                        f"HF_HUB_CACHE/HF_HOME to the cache that holds it")
    return _single_file_or_folder(snapshot_of(repo_folder, revision))
