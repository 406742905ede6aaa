"""Putting an unchanged input file into an output without ever sharing what a user may edit.

A hard link is one inode under two names: appending to the output's ``config.json`` or a
``chmod`` on it would change the input. So: a reflink (a new inode sharing the data blocks,
copy-on-write) where the filesystem can; otherwise a hard link only for large weight files,
which nobody edits in place (editc itself always writes a new file and renames it); otherwise a
copy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".pb")
HARD_LINK_MIN_BYTES = 1 << 20  # below this a copy costs nothing worth saving
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def _reflink(src: Path, dst: Path) -> bool:
    try:
        with src.open("rb") as source, dst.open("xb") as target:
            try:
                fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
            except OSError:
                ok = False
            else:
                ok = True
    except OSError:
        return False
    if not ok:
        dst.unlink()
        return False
    shutil.copystat(src, dst)
    return True


def may_hard_link(path: Path) -> bool:
    """Large weight files only: configs, tokenizer files and the like are always copied."""
    return path.suffix.lower() in WEIGHT_SUFFIXES and path.stat().st_size >= HARD_LINK_MIN_BYTES


def link_or_copy(src: Path, dst: Path) -> str:
    """Place ``src`` at ``dst`` (which must not exist); returns "reflink", "link" or "copy"."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if _reflink(src, dst):
        return "reflink"
    if may_hard_link(src):
        try:
            os.link(src, dst)
            return "link"
        except OSError:
            pass
    shutil.copy2(src, dst)
    return "copy"
