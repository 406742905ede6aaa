"""Record (or check) the edited tensors of the example recipes, as sha256 per tensor.

One command regenerates the committed record after an intended change of the edits::

    PYTHONPATH=. python tools/edited_tensors.py            # rewrite tests/data/edited_tensors.json
    PYTHONPATH=. python tools/edited_tensors.py --check    # compare, exit 1 on a difference

Each recipe is compiled on its own model (the default toy) to a delta file (only the edited
tensors, in the model's dtype), whose tensors are hashed byte for byte with their dtype and
shape. ``tests/test_edited_tensors.py`` recompiles and compares, so a refactor that changes an
edited tensor by one bit fails; a change made on purpose regenerates the file and says so in
its commit.

Bits hold per machine, not across CPUs: torch's float32 kernels sum in a different order on an
AVX-512 and an AVX2 CPU, and the ridge solve (condition number ~1e8 at λ = 0.01) amplifies
those last bits into one-ulp differences of the fp16 weights (measured with
``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU: 7-10 % of the toy's edited elements, max one
ulp, ‖ΔW‖/‖W‖ ≈ 1e-4; encoding in float64 left 1 element of 262,144, so no arithmetic short of
exact would make them equal). So the record also keeps, per tensor, its norm and 8 projections
on fixed random directions, and the machine that wrote it: on that machine the bits must match;
on another, each projection must be within ``TOLERANCE`` · ‖W‖ (one-ulp noise moves them
~1e-4 · ‖W‖; a real change of the edit moves them far more).
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
PROJECTIONS = 8
TOLERANCE = 1e-3  # of the tensor's norm, per projection, when the CPU differs from the record's


def tensor_digest(tensor) -> str:
    import torch

    flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}:" + hashlib.sha256(
        flat.numpy().tobytes()).hexdigest()


def tensor_summary(tensor) -> dict:
    """sha256 of the bits, plus the norm and projections on fixed random directions (float64)."""
    import torch

    values = tensor.detach().cpu().double().reshape(-1)
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(PROJECTIONS, values.numel(), generator=generator, dtype=torch.float64)
    return {"sha256": tensor_digest(tensor), "norm": float(values.norm()),
            "projections": [float(p) for p in directions @ values]}


def machine() -> dict:
    """What decides the bits: torch's version, the CPU's kernels and the CPU itself (an AMD EPYC
    and an Intel Xeon both run torch's AVX512 kernels, yet round differently: measured, every
    edited tensor's bits differ between the two). The CPU model is compared only when the
    record names one."""
    import platform

    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpu_model": cpu_model()}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def same_machine(recorded: dict) -> bool:
    """Whether this machine is the one that wrote ``recorded``: the same torch, kernels and CPU
    (the record may name the CPU by the start of its model name, e.g. "AMD EPYC")."""
    here = machine()
    return all(here[k] == recorded.get(k) if k != "cpu_model" else
               bool(recorded.get(k)) and here[k].startswith(recorded[k]) for k in here)


def compare(recorded: dict, now: dict, same_machine: bool) -> list[str]:
    """Problems with ``now`` against ``recorded`` (per-recipe entries); empty when it matches."""
    problems = []
    if sorted(now["tensors"]) != sorted(recorded["tensors"]):
        return [f"a different set of tensors was edited: {sorted(now['tensors'])}"]
    if now["layers"] != recorded["layers"]:
        problems.append(f"layers {now['layers']} != recorded {recorded['layers']}")
    for name, old in recorded["tensors"].items():
        new = now["tensors"][name]
        if new["sha256"] == old["sha256"]:
            continue
        if same_machine:
            problems.append(f"{name}: bits differ on the machine that wrote the record")
            continue
        worst = max(abs(a - b) for a, b in zip(new["projections"], old["projections"])) / max(old["norm"], 1e-30)
        if worst > TOLERANCE or abs(new["norm"] - old["norm"]) > TOLERANCE * old["norm"]:
            problems.append(f"{name}: moved {worst:.2e} x its norm (tolerance {TOLERANCE:g} on another CPU)")
    return problems


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
        "tensors": {name: tensor_summary(t) for name, t in sorted(tensors.items())},
    }


def record(recipes=RECIPES) -> dict:
    return {"machine": machine(), "recipes": {Path(r).name: edited_tensors(ROOT / r) for r in recipes}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the record instead of writing it")
    args = parser.parse_args(argv)
    now = record()
    if args.check:
        old = json.loads(RECORD.read_text())
        same_machine = old["machine"] == now["machine"]
        problems = [f"{recipe}: {p}" for recipe, entry in old["recipes"].items()
                    for p in compare(entry, now["recipes"][recipe], same_machine)]
        if not problems:
            print(f"edited tensors match {RECORD.relative_to(ROOT)}"
                  + ("" if same_machine else f" (recorded on {old['machine']}, within tolerance here)"))
            return 0
        print("\n".join(problems))
        return 1
    RECORD.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
