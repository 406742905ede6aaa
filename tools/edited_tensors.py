"""Record (or check) the edited tensors of the example recipes, as sha256 per tensor.

One command regenerates the committed record after an intended change of the edits::

    PYTHONPATH=. python tools/edited_tensors.py            # rewrite tests/data/edited_tensors.json
    PYTHONPATH=. python tools/edited_tensors.py --check    # compare, exit 1 on a difference

Each recipe is compiled on its own model (the default toy) to a delta file (only the edited
tensors, in the model's dtype), whose tensors are hashed byte for byte with their dtype and
shape. ``tests/test_edited_tensors.py`` recompiles and compares, so a refactor that changes an
edited tensor by one bit fails; a change made on purpose regenerates the file and says so in
its commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("recipes/van_gogh.yaml", "recipes/snoopy.yaml", "recipes/british_monarch.yaml")
RECORD = ROOT / "tests" / "data" / "edited_tensors.json"


def tensor_digest(tensor) -> str:
    import torch

    flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}:" + hashlib.sha256(
        flat.numpy().tobytes()).hexdigest()


def edited_tensors(recipe_path: str | Path, layers: dict[str, list[int]] | None = None) -> dict:
    """Compile one recipe (delta only, no verify) and hash its edited tensors.

    ``layers`` (concept -> layer indices) pins edits whose recipe says ``layers: auto`` to the
    layers recorded before, so a check need not rerun LocoGen (minutes on the toy model).
    """
    import dataclasses

    from safetensors.torch import load_file

    from compiler.compile import compile_to_disk
    from compiler.recipe import load_recipe

    recipe = load_recipe(Path(recipe_path))
    if layers:
        recipe = dataclasses.replace(recipe, edits=tuple(
            dataclasses.replace(edit, layers=tuple(layers[edit.concept]))
            if edit.layers == "auto" and layers.get(edit.concept) else edit
            for edit in recipe.edits))
    with tempfile.TemporaryDirectory(prefix="editc-edited-") as tmp:
        out = Path(tmp) / "out"
        manifest = compile_to_disk(recipe, out=out, formats=("delta",), verify=False, progress=False)
        tensors = load_file(str(out / "delta.safetensors"))
    return {
        "layers": {e["concept"]: e["layers"] for e in manifest["edits"]},
        "tensors": {name: tensor_digest(t) for name, t in sorted(tensors.items())},
    }


def record(recipes=RECIPES) -> dict:
    return {Path(r).name: edited_tensors(ROOT / r) for r in recipes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the record instead of writing it")
    args = parser.parse_args(argv)
    now = record()
    if args.check:
        old = json.loads(RECORD.read_text())
        if old == now:
            print(f"edited tensors identical to {RECORD.relative_to(ROOT)}")
            return 0
        print(json.dumps({"recorded": old, "now": now}, indent=1))
        return 1
    RECORD.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
