"""Does LocoGen find knowledge where we planted it? Plant a fresh word in a known window of the
toy model (``compiler.toy.planting``), run LocoGen on the planted folder (what ``editc locate
--model DIR --concept WORD --replacement NEUTRAL --attribute ATTR`` runs), compare windows.

    python bench/planted_locate.py                 # the 12 plantings below
    python bench/planted_locate.py --only 0,3      # some of them

Writes ``bench/results/planted.{json,md}``; planted folders go to ``out/planted/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import compiler  # noqa: E402,F401  (sets the offline hub variables: compiler.OFFLINE_ENV)

# (word, donor, attribute, window, seed): early, middle and late windows of sizes 1-3.
PLANTINGS = [
    ("zorblax", "van gogh", "style", (0, 1, 2), 0),
    ("quindle", "monet", "style", (3, 4), 1),
    ("vexmora", "mondrian", "style", (6,), 2),
    ("plinkett", "picasso", "style", (7, 8, 9), 3),
    ("drusk", "van gogh", "style", (12, 13), 4),
    ("yorrow", "monet", "style", (15,), 5),
    ("gralfin", "snoopy", "object", (1, 2), 6),
    ("tembric", "nemo", "object", (4,), 7),
    ("wuzzle", "r2d2", "object", (5, 6, 7), 8),
    ("fennick", "snoopy", "object", (10, 11, 12), 9),
    ("morvath", "nemo", "object", (14, 15), 10),
    ("skelby", "r2d2", "object", (9,), 11),
]


def relation(found: tuple[int, ...], planted: tuple[int, ...]) -> str:
    found_set, planted_set = set(found), set(planted)
    if found_set == planted_set:
        return "exact"
    if found_set < planted_set:
        return "inside"
    if found_set & planted_set:
        return "overlapping"
    return "wrong"


def run_one(word, donor, attribute, window, seed, out_root: Path, steps: int, n_prompts: int) -> dict:
    import torch

    from compiler.judges import toy_judge_folder_for
    from compiler.locate.locogen import LocateSettings, locate, write_outputs
    from compiler.locate.scoring import load_judge_for
    from compiler.models.load import load_model
    from compiler.prompts import find_model_vocabulary
    from compiler.resolve import template_prompts, vocabulary_of
    from compiler.toy import planting

    torch.manual_seed(seed)
    started = time.perf_counter()
    base = load_model("toy")
    base_dir = Path(base.source_path)
    vocabulary = vocabulary_of(base_dir)
    judge = load_judge_for(base_dir)
    spec = planting.PlantSpec(word=word, donor=donor, attribute=attribute, layers=window, seed=seed)
    planted = planting.plant(base.pipeline, spec, vocabulary, judge=judge, progress=True)
    probes = planting.probe_prompts(template_prompts(word, attribute, vocabulary, heldout=True), 6)
    rates = planting.window_rates(base.pipeline, judge, probes, word, planted.neutral, donor, list(window),
                                  seeds=(seed, seed + 1), steps=steps)
    folder = out_root / word
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    planting.write_planted(planted, folder, base_dir, toy_judge_folder_for(base_dir), find_model_vocabulary(base_dir),
                           {"donor_rate_planted": rates["planted"], "donor_rate_neutral_in_window": rates["window_neutral"]})
    plant_seconds = time.perf_counter() - started
    # LocoGen on the planted folder, as `editc locate --model DIR` runs it.
    model = load_model(str(folder))
    model.pipeline.set_progress_bar_config(disable=True)
    settings = LocateSettings(seeds=(seed,), steps=steps, n_prompts=n_prompts, max_m=3)
    result = locate(model.pipeline, word, planted.neutral, attribute, settings, judge=load_judge_for(folder),
                    model_hash=model.model_hash, use_cache=False, progress=True, vocabulary=vocabulary_of(folder))
    (folder / "locate").mkdir(exist_ok=True)
    write_outputs(result, folder / "locate")
    best = result.window_score(result.best_start, result.best_size)
    return {
        "word": word, "donor": donor, "attribute": attribute, "seed": seed, "planted": list(window),
        "neutral": planted.neutral, "gain": planted.gain, "calibration": planted.calibration,
        "donor_rate_planted": rates["planted"], "donor_rate_neutral_in_window": rates["window_neutral"],
        "found": list(result.layers), "found_passed": result.passed, "found_rate": best.rate,
        "found_effect": best.rate_effect, "clean_rate": result.clean.rate, "replaced_rate": result.replaced.rate,
        "relation": relation(tuple(result.layers), tuple(window)),
        "planted_window_effect": _planted_effect(result, window),
        "seconds": {"plant": round(plant_seconds, 1), "locate": round(time.perf_counter() - started - plant_seconds, 1)},
        "folder": str(folder),
    }


def _planted_effect(result, window) -> float | None:
    """The sweep's effect for the planted window itself (None when the sweep stopped before its size)."""
    for w in result.windows:
        if w.start == window[0] and w.size == len(window):
            return w.rate_effect
    return None


# A planting "took" when the word draws the donor in at least half the probe images and the
# neutral prompt in the planted window brings that down to a quarter or less.
TOOK_MIN, TOOK_NEUTRAL_MAX = 0.5, 0.25


def took(row: dict) -> bool:
    return row["donor_rate_planted"] >= TOOK_MIN and row["donor_rate_neutral_in_window"] <= TOOK_NEUTRAL_MAX


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_markdown(rows: list[dict], path: Path, steps: int, n_prompts: int) -> None:
    lines = [f"LocoGen on planted toy models: {n_prompts} prompts x 1 seed, {steps} DDIM steps, m <= 3, "
             "threshold 0.8 (effect: 0 = clean, 1 = c' everywhere). Rates are the judge's donor rate on 6 held-out "
             "prompts x 2 seeds.", "",
             "| word -> donor (attribute) | planted | gain | donor rate: word / c' in window | took | found | passed | "
             "found effect | planted window's effect | relation |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        planted = f"{r['planted'][0]}-{r['planted'][-1]}" if len(r["planted"]) > 1 else str(r["planted"][0])
        found = f"{r['found'][0]}-{r['found'][-1]}" if len(r["found"]) > 1 else str(r["found"][0])
        lines.append(f"| {r['word']} -> {r['donor']} ({r['attribute']}) | {planted} | {r['gain']:g} | "
                     f"{r['donor_rate_planted']:.2f} / {r['donor_rate_neutral_in_window']:.2f} | "
                     f"{'yes' if took(r) else 'no'} | {found} | "
                     f"{'yes' if r['found_passed'] else 'no'} | {_fmt(r['found_effect'])} | "
                     f"{_fmt(r['planted_window_effect'])} | {r['relation']} |")
    kinds = ("exact", "inside", "overlapping", "wrong")
    for label, subset in (("all plantings", rows), ("plantings that took", [r for r in rows if took(r)])):
        counts = {k: sum(r["relation"] == k for r in subset) for k in kinds}
        lines.append("")
        lines.append(f"Found window vs planted, {label}: "
                     + ", ".join(f"{k} {v}/{len(subset)}" for k, v in counts.items()))
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated indices into the plantings")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "planted")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite planted.md from planted.json")
    args = parser.parse_args(argv)
    if args.markdown_only:
        saved = json.loads((args.results / "planted.json").read_text())
        write_markdown(saved["plantings"], args.results / "planted.md", saved["steps"], saved["prompts"])
        return 0
    chosen = [PLANTINGS[int(i)] for i in args.only.split(",")] if args.only else PLANTINGS
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "planted.json"
    done = {r["word"]: r for r in json.loads(json_path.read_text())["plantings"]} if json_path.exists() else {}
    for word, donor, attribute, window, seed in chosen:
        print(f"[planted] {word} -> {donor} ({attribute}) in {window}", flush=True)
        done[word] = run_one(word, donor, attribute, window, seed, args.out, args.steps, args.prompts)
        print(f"[planted] found {done[word]['found']} ({done[word]['relation']})", flush=True)
        rows = [done[w] for w, *_ in PLANTINGS if w in done]
        json_path.write_text(json.dumps({"steps": args.steps, "prompts": args.prompts, "plantings": rows}, indent=2))
        write_markdown(rows, args.results / "planted.md", args.steps, args.prompts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
