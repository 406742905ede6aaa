"""Do the example recipes work? Compile each on the toy world and verify it.

    python bench/edit_toy.py [--seeds 8] [--methods locoedit,quickfix:out_proj,quickfix:v_proj]
    python bench/edit_toy.py --methods locoedit,locoedit+nopad,locoedit+noeos --recipes van_gogh.yaml,snoopy.yaml --results edit_toy_padding

A method may carry an option: ``+nopad`` (UNet edits remap the subject token and EOS, not the
padding positions after EOS) or ``+noeos`` (the subject token only).

For the style (van gogh -> a painting), object (snoopy -> a dog) and fact (the british monarch
-> king charles) recipes, and each method (Diff-QuickFix at each of its two sites: the paper's
``out_proj`` and ``v_proj``), runs ``editc compile`` with verify and collects
verify's numbers: the judge's zero-shot accuracy of the concept on the solve templates
(efficacy) and on held-out paraphrases (generalization), base -> edited, and the accuracy of
neighbouring concepts and generic prompts (specificity). Writes
``bench/results/edit_toy.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RECIPES = ("van_gogh.yaml", "snoopy.yaml", "british_monarch.yaml")


def run_one(recipe_file: str, variant: str, seeds: int, out_root: Path) -> dict:
    from compiler.compile import compile_to_disk
    from compiler.recipe import load_recipe

    from compiler.methods import rows as row_module

    variant_name = variant
    variant, _, option = variant.partition("+")
    method, _, site = variant.partition(":")
    recipe = load_recipe(ROOT / "recipes" / recipe_file)
    edits = []
    for edit in recipe.edits:
        layers = None if method == "quickfix" else ("auto" if edit.layers is None else edit.layers)
        # A recipe's explicit eos was chosen for its own method; the other variants run with
        # their method's default (quickfix at v_proj: off).
        eos = edit.eos if method == edit.method else None
        if option == "noeos":  # "+noeos": the subject token only
            eos = False
        edits.append(dataclasses.replace(edit, method=method, layers=layers, eos=eos,
                                         options=(("site", site),) if site else ()))
    recipe = dataclasses.replace(recipe, edits=tuple(edits),
                                 verify=dataclasses.replace(recipe.verify, enabled=True, seeds=seeds))
    out = out_root / f"{Path(recipe_file).stem}-{variant_name.replace(':', '-').replace('+', '-')}"
    # "+nopad": UNet edits remap the subject token and EOS but not the padding after EOS.
    saved = row_module.PADDING_ROWS
    row_module.PADDING_ROWS = option != "nopad"
    try:
        manifest = compile_to_disk(recipe, out=out, force=True, verify=True, progress=False)
    finally:
        row_module.PADDING_ROWS = saved
    report = json.loads((out / "verify" / "verify.json").read_text())
    edit = report["edits"][0]
    groups = edit["groups"]
    fact = edit["attribute"] == "fact"
    key = "replacement_accuracy" if fact else "accuracy"

    def pair(group: str) -> tuple[float, float]:
        g = groups[group]
        return g["base"][key], g["edited"][key]

    spec = groups["specificity"]
    generic = report["generic"]
    return {
        "recipe": recipe_file, "method": variant_name, "concept": edit["concept"], "attribute": edit["attribute"],
        "layers": manifest["edits"][0]["layers"], "measure": "shows the new fact" if fact else "shows the concept",
        "efficacy": pair("efficacy"), "generalization": pair("generalization"),
        "neighbours": (spec["base"]["accuracy"], spec["edited"]["accuracy"]),
        "generic": (generic["base"]["accuracy"], generic["edited"]["accuracy"]),
        "solve_seconds": manifest["timings_seconds"].get("solve"),
        "passed": report["passed"], "failed_gates": report["failed_gates"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--methods", default="locoedit,quickfix:out_proj,quickfix:v_proj",
                        help="comma-separated; quickfix takes :out_proj or :v_proj")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated files in recipes/")
    parser.add_argument("--results", default="edit_toy", help="name of the bench/results/<name>.json written")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-edit")
    args = parser.parse_args()
    rows = [run_one(r, m, args.seeds, args.out) for r in args.recipes.split(",") for m in args.methods.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2) + "\n")
    pct = lambda p: f"{p[0]:.0%} → {p[1]:.0%}"  # noqa: E731
    print("| edit | method | layers | measure | efficacy | generalization | neighbours | generic | solve | gates |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concept']} ({r['attribute']}) | {r['method']} | {r['layers'] or 'text enc. L0 ' + r['method'].partition(':')[2]} | {r['measure']} | "
              f"{pct(r['efficacy'])} | {pct(r['generalization'])} | {pct(r['neighbours'])} | {pct(r['generic'])} | "
              f"{r['solve_seconds']:.3f} s | {'pass' if r['passed'] else 'FAIL: ' + ', '.join(r['failed_gates'])} |")


if __name__ == "__main__":
    main()
