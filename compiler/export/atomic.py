"""Atomic outputs: write into a temporary sibling, then rename it into place.

A reader never sees a half-written output: a file or folder appears under its final name only
once it is complete, and a failed write leaves nothing behind but the old output (if any). An
existing output is replaced only when the caller passes ``force=True``; an output path that is
(or lies inside, or contains) one of the inputs is refused, so that an input is never modified.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from compiler.errors import UserError


def _is_same_or_inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output_path(out_path: str | os.PathLike, *, force: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output that exists (without ``force``) or that overlaps an input.

    Returns the absolute output path. Raises ``UserError`` naming the path and the fix.
    """
    out = Path(out_path).expanduser().absolute()
    for given in inputs:
        source = Path(given).expanduser().absolute()
        if _is_same_or_inside(out.resolve(), source.resolve()) or _is_same_or_inside(
                source.resolve(), out.resolve()):
            raise UserError(f"{out}: the output would overwrite the input {source}; choose "
                            f"another output path (inputs are never modified)")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out}: already exists; pass --force to replace it or choose "
                            f"another output path")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: the output's parent folder does not exist; create it "
                        f"first")
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(temporary: Path, final: Path) -> None:
    """Move ``temporary`` to ``final``; an existing ``final`` is moved aside first and deleted
    after the rename, so that ``final`` is never missing half-way through a folder swap."""
    if final.exists() or final.is_symlink():
        aside = final.with_name(f".{final.name}.old-{os.getpid()}")
        _remove(aside)
        os.rename(final, aside)
        try:
            os.rename(temporary, final)
        except OSError:
            os.rename(aside, final)
            raise
        _remove(aside)
    else:
        os.rename(temporary, final)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, force: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out_dir``; rename it to ``out_dir`` on success.

    On an exception the temporary folder is deleted and ``out_dir`` is left as it was.
    """
    final = check_output_path(out_dir, force=force, inputs=inputs)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield temporary
        os.chmod(temporary, 0o755)  # mkdtemp makes it 0700; an output folder should not be
        _replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(out_path: str | os.PathLike, *, force: bool = False,
                       inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``out_path``; rename it to ``out_path`` on success.

    The caller writes the whole file at the yielded path (it does not exist yet). On an
    exception the temporary file is deleted and ``out_path`` is left as it was.
    """
    final = check_output_path(out_path, force=force, inputs=inputs)
    if final.is_dir():
        raise UserError(f"{final}: is a folder; a file output cannot replace it")
    descriptor, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(descriptor)
    temporary = Path(name)
    temporary.unlink()
    try:
        yield temporary
        if not temporary.is_file():
            raise RuntimeError(f"the writer did not create {temporary}")
        os.chmod(temporary, 0o644)
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def write_atomically(out_path: str | os.PathLike, data: bytes | str, *, force: bool = False) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``out_path`` atomically."""
    with atomic_output_file(out_path, force=force) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(out_path).expanduser().absolute()
