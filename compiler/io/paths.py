"""Where an output may go: never onto, into or around an input; somewhere writable; said plainly.

These checks run before any model is loaded, so a mistake costs a second, not a compile.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from compiler.errors import UserError

PathLike = str | os.PathLike


def expand(path: PathLike, what: str = "--out") -> Path:
    """``~`` expanded, made absolute (``..`` kept lexical); an empty path is an error."""
    text = os.fspath(path)
    if not str(text).strip():
        raise UserError(f"{what}: is empty; give an output path")
    return Path(os.path.abspath(os.path.expanduser(text)))


def input_paths(*given: PathLike | None) -> list[Path]:
    """The inputs among ``given`` on disk: paths, 'toy' (the embedded model's folder), Hugging
    Face repo ids (their cache folder); a name that resolves to nothing is left to the loader."""
    paths = []
    for item in given:
        if item is None:
            continue
        path = Path(os.path.expanduser(os.fspath(item)))
        if path.exists():
            paths.append(path)
            continue
        from compiler.models.load import resolve_model_path

        try:  # 'toy', a Hugging Face repo id or cache folder
            resolved = resolve_model_path(item)
        except UserError:
            continue
        paths.append(resolved)
        # A hub snapshot's files are links into the repo's blobs/: the whole repo folder is input.
        paths.extend(p for p in resolved.parents if p.name.startswith("models--"))
    return paths


def _overlap(out: Path, source: Path) -> str | None:
    real_out, real_source = out.resolve(), source.resolve()
    if real_out == real_source:
        return "is"
    if real_source in real_out.parents:
        return "lies inside"
    if real_out in real_source.parents:
        return "contains"
    if out.exists() and source.exists() and os.path.samefile(out, source):
        return "is (a hard link of)"
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_output_path(out_path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = (),
                      kind: str = "any") -> Path:
    """Refuse an output that overlaps an input, exists without ``force``, or cannot be written.

    ``kind`` is "file", "dir" or "any" (what will be written there). Returns the absolute path.
    Raises ``UserError`` (exit 2) naming the path and the fix.
    """
    out = expand(out_path)
    for source in input_paths(*inputs):
        how = _overlap(out, Path(os.path.abspath(source)))
        if how:
            raise UserError(f"{out}: the output {how} the input {source}; choose an output path outside "
                            f"every input (inputs are never modified)")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out}: already exists; pass --force to replace it or choose another output path")
        if kind == "file" and out.is_dir():
            raise UserError(f"{out}: is a folder; a file output cannot replace it, choose another path")
    ancestor = _nearest_existing(out.parent)
    if not ancestor.is_dir():
        raise UserError(f"{out}: {ancestor} is a file, not a folder; choose another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{out}: the folder {ancestor} is not writable; choose another output path")
    return out


def resolve_recipe_output(recipe_path: PathLike, value: str, field: str = "outputs.dir") -> tuple[Path, bool]:
    """An output path written in a recipe: ``~`` expanded, relative paths taken from the recipe's
    folder and refused when they climb out of it. Returns (path, absolute_in_recipe) so that a
    caller can say an absolute path aloud in its summary."""
    if not str(value).strip():
        raise UserError(f"{recipe_path}: {field}: is empty; give a folder or remove the field")
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return Path(os.path.abspath(expanded)), True
    base = Path(os.path.abspath(Path(recipe_path).parent))
    resolved = Path(os.path.abspath(base / expanded))
    if resolved != base and base not in resolved.parents:
        raise UserError(f"{recipe_path}: {field}: {value!r} climbs out of the recipe's folder {base}; "
                        f"use a path inside it, or an absolute path")
    return resolved, False
