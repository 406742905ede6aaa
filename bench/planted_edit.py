"""Located layers vs every layer, on planted toy models: remove the planted word twice — LocoEdit
on the window LocoGen found (``bench/planted_locate.py``), and on all 16 layers — and verify both.

    python bench/planted_edit.py --words zorblax,gralfin

For each planted folder (``out/planted/WORD``) it writes two recipes (``layers: [found]`` and
``layers: [0..15]``, replacement: the planting's neutral, ``neighbours`` including the donor
itself), runs ``python -m compiler.cli compile`` and ``python -m compiler.cli verify`` on them
and collects verify's numbers into ``bench/results/planted_edit.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compiler import OFFLINE_ENV  # noqa: E402 - light: only sets the offline hub variables
ALL_LAYERS = list(range(16))


def recipe_for(folder: Path, word: str, neutral: str, attribute: str, donor: str, layers: list[int],
               seeds: int, steps: int) -> dict:
    return {
        "model": str(folder),
        "edits": [{"concept": word, "replacement": neutral, "attribute": attribute, "method": "locoedit",
                   "layers": layers}],
        "outputs": {"formats": ["diffusers"]},
        "verify": {"seeds": seeds, "steps": steps, "neighbours": [donor]},
    }


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def groups_of(report: dict) -> dict:
    """verify's accuracy per group, base -> edited: each edit group, each probed neighbour of it,
    and the generic group."""
    out = {}
    for edit in report.get("edits", []):
        for name, group in edit.get("groups", {}).items():
            out[name] = (group["base"]["accuracy"], group["edited"]["accuracy"])
            if len(group.get("subjects", [])) > 1:
                for subject in group["subjects"]:
                    out[f"neighbour {subject['subject']}"] = (subject["base_accuracy"], subject["edited_accuracy"])
    if report.get("generic"):
        out["generic"] = (report["generic"]["base"]["accuracy"], report["generic"]["edited"]["accuracy"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", required=True, help="planted words (folders under --planted)")
    parser.add_argument("--planted", type=Path, default=ROOT / "out" / "planted")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4, help="verify's prompts per group")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    located = {r["word"]: r for r in json.loads((args.results / "planted.json").read_text())["plantings"]}
    path = args.results / "planted_edit.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for word in args.words.split(","):
        info = located[word]
        folder = args.planted / word
        work = ROOT / "out" / "planted_edit" / word
        work.mkdir(parents=True, exist_ok=True)
        for variant, layers in (("located", info["found"]), ("all 16", ALL_LAYERS)):
            name = "located" if variant == "located" else "all"
            recipe = work / f"{name}.yaml"
            recipe.write_text(yaml.safe_dump(recipe_for(folder, word, info["neutral"], info["attribute"], info["donor"],
                                                        layers, args.seeds, args.steps), sort_keys=False))
            edited = work / f"{name}-model"
            done = run_cli("compile", str(recipe), "--out", str(edited), "--force")
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            checked = run_cli("verify", str(recipe), "--edited", str(edited), "--report", str(work / f"{name}-report"),
                              "--force", "--json", "--quiet", "--prompts", str(args.prompts))
            if checked.returncode not in (0, 1):
                print(checked.stderr[-2000:], file=sys.stderr)
                return 1
            report = json.loads(checked.stdout)
            rows = [r for r in rows if not (r["word"] == word and r["variant"] == variant)]
            rows.append({"word": word, "donor": info["donor"], "attribute": info["attribute"], "variant": variant,
                         "layers": layers, "passed": checked.returncode == 0, "groups": groups_of(report),
                         "report": str(work / f"{name}-report" / "verify.json")})
            print(f"[planted-edit] {word} {variant}: {rows[-1]['groups']}", flush=True)
            path.write_text(json.dumps({"seeds": args.seeds, "steps": args.steps, "rows": rows}, indent=2))
    write_markdown(rows, args.results / "planted_edit.md", args.seeds, args.steps, args.prompts)
    return 0


def write_markdown(rows, path: Path, seeds: int, steps: int, prompts: int) -> None:
    lines = [f"Remove the planted word (LocoEdit, replacement: the planting's neutral), verify with {seeds} seeds, "
             f"{steps} steps, {prompts} prompts per group: judge's accuracy base -> edited.", "",
             "| planted word -> donor | layers | efficacy | generalization | the donor | other neighbours | generic | verify |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["groups"]

        def cell(key):
            value = g.get(key)
            return "-" if not value or value[0] is None else f"{value[0]:.2f} -> {value[1]:.2f}"

        donor = cell(f"neighbour {r['donor']}")
        others = ", ".join(f"{k.removeprefix('neighbour ')} {v[0]:.2f} -> {v[1]:.2f}" for k, v in g.items()
                           if k.startswith("neighbour ") and k != f"neighbour {r['donor']}" and v[0] is not None)
        generic = ", ".join(f"{v[0]:.2f} -> {v[1]:.2f}" for k, v in g.items() if k.startswith("generic") and v[0] is not None)
        layers = "0-15" if r["layers"] == ALL_LAYERS else ",".join(map(str, r["layers"]))
        lines.append(f"| {r['word']} -> {r['donor']} | {layers} | {cell('efficacy')} | {cell('generalization')} | "
                     f"{donor} | {others or '-'} | {generic or '-'} | {'pass' if r['passed'] else 'fail'} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
