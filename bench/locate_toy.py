"""Where does the toy world keep its knowledge? LocoGen, causal tracing and the papers'
located-vs-random-vs-all edit comparison, measured on the embedded toy model.

    OMP_NUM_THREADS=2 python bench/locate_toy.py [--steps 15] [--prompts 6] [--seeds 0]

1. LocoGen for a style (van gogh -> a painting), an object (snoopy -> a dog) and a fact
   (the british monarch -> king charles): the located window of cross-attention layers.
2. Causal tracing of "a house in the style of van gogh" (subject "van gogh"): does the text
   encoder have one causal state (the paper: layer 0's self-attention at the last subject
   token), and which UNet blocks restore the style?
3. Appendix F of the ICML paper: LocoEdit on the located window vs a random window of the same
   size vs all layers, by efficacy (the concept's rate on held-out prompts) and specificity
   (neighbouring concepts and plain objects kept). ``compare_edit_windows`` takes any
   ``apply_edit(layers) -> pipe``; here it is editc's own compile (recipe -> LocoEdit).

Writes ``bench/results/locate_toy.json``, ``bench/results/locate_toy.md`` (the tables) and the
heat maps and grids under ``bench/results/locate_toy/``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compiler.generate import generate_images
from compiler.locate import LocateSettings, locate, write_outputs
from compiler.locate.scoring import load_judge_for, presence
from compiler.locate.trace import trace_text_encoder, trace_unet, write_trace_outputs
from compiler.models.families import LayerWindow
from compiler.toy import world

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    attribute: str
    concept: str
    replacement: str
    neighbours: tuple[str, ...]  # concepts of the same kind an edit should leave alone


CASES = (
    Case("style", "van gogh", "a painting", ("monet", "mondrian")),
    Case("object", "snoopy", "a dog", ("nemo", "r2d2")),
    Case("fact", "the british monarch", "king charles", ("the british prime minister",)),
)
TRACE_PROMPT, TRACE_SUBJECT = "a house in the style of van gogh", "van gogh"
# Windows aligned with the UNet's stages (SD-1.5 layout, papers' order): how far beyond
# m <= 3 a concept reaches when no small window holds it.
STAGE_PROBES = {
    "down (0-5)": LayerWindow(0, 6), "mid (6)": LayerWindow(6, 1), "up (7-15)": LayerWindow(7, 9),
    "0-7": LayerWindow(0, 8), "8-15": LayerWindow(8, 8), "0-11": LayerWindow(0, 12), "4-15": LayerWindow(4, 12),
}


# ----------------------------------------------------------------------------- evaluation prompts
def _prompts_with(phrase: str, attribute: str, count: int) -> list[str]:
    """Held-out paraphrases (never used by LocoGen or the solve) that mention ``phrase``."""
    prompts = []
    if attribute == "style":
        subjects = [f"a {c} {o}" for o in world.OBJECTS for c in world.COLOURS]
        for i in range(count):
            prefix = world.HELDOUT_PREFIXES[i % len(world.HELDOUT_PREFIXES)]
            prompts.append(f"{prefix}{subjects[(i * 7) % len(subjects)]} in the style of {phrase}")
    else:
        styles = (None, "monet", "mondrian", "picasso")
        for i in range(count):
            prefix = world.HELDOUT_PREFIXES[i % len(world.HELDOUT_PREFIXES)]
            style = styles[(i // len(world.HELDOUT_PREFIXES)) % len(styles)]
            prompts.append(f"{prefix}{phrase}" + (f" in the style of {style}" if style else ""))
    return prompts


def _rate(pipe, judge, prompts: list[str], phrase: str, seeds: tuple[int, ...], steps: int) -> float:
    all_prompts = [p for p in prompts for _ in seeds]
    images = generate_images(pipe, all_prompts, [s for _ in prompts for s in seeds], steps=steps, progress=False)
    return float(presence(judge, images, phrase).mean())


def _objects_kept(pipe, judge, steps: int) -> float:
    """Plain objects without the concept: the fraction still drawn as the right object."""
    prompts = [f"{world.HELDOUT_PREFIXES[i % 2]}a {c} {o}"
               for i, (o, c) in enumerate(zip(world.OBJECTS, list(world.COLOURS) * 2))]
    images = generate_images(pipe, prompts, list(range(len(prompts))), steps=steps, progress=False)
    scenes = judge.classify(images)
    return float(np.mean([scene.identity == o for scene, o in zip(scenes, world.OBJECTS)]))


def evaluate(pipe, judge, case: Case, *, seeds: tuple[int, ...], steps: int, n_prompts: int) -> dict:
    """Efficacy (the concept's rate, or the fact's new answer's) and specificity of ``pipe``."""
    judged = case.replacement if case.attribute == "fact" else case.concept
    out = {"efficacy_rate": _rate(pipe, judge, _prompts_with(case.concept, case.attribute, n_prompts), judged,
                                  seeds, steps)}
    for neighbour in case.neighbours:
        out[f"kept:{neighbour}"] = _rate(pipe, judge, _prompts_with(neighbour, case.attribute, n_prompts),
                                         neighbour, seeds, steps)
    out["kept:objects"] = _objects_kept(pipe, judge, steps)
    return out


def probe_stages(pipe, judge, result, steps: int) -> dict[str, float]:
    """The judged rate with c′ in each of ``STAGE_PROBES``, on the sweep's own prompts and seeds."""
    from compiler.locate import generate_with_windows
    from compiler.locate.engine import GenerationSettings

    settings = result.settings
    pairs = [(p, a, s) for p, a in zip(settings.prompts, settings.alternative_prompts) for s in settings.seeds]
    samples = [(name, p, a, s) for name in STAGE_PROBES for p, a, s in pairs]
    images = generate_with_windows(pipe, [x[1] for x in samples], [x[2] for x in samples], [x[3] for x in samples],
                                   [STAGE_PROBES[x[0]] for x in samples], GenerationSettings(steps=steps, batch=64))
    rates = presence(judge, images, result.judged_phrase)
    return {name: float(rates[i * len(pairs) : (i + 1) * len(pairs)].mean()) for i, name in enumerate(STAGE_PROBES)}


def random_window(size: int, num_layers: int, avoid: LayerWindow, seed: int = 0) -> LayerWindow:
    """A window of ``size`` layers that shares no layer with ``avoid`` (deterministic)."""
    starts = [j for j in range(num_layers - size + 1)
              if j + size <= avoid.start or j >= avoid.start + avoid.size]
    return LayerWindow(random.Random(seed).choice(starts), size)


def compare_edit_windows(apply_edit: Callable[[list[int]], object], judge, case: Case, located: LayerWindow,
                         num_layers: int, *, seeds: tuple[int, ...], steps: int, n_prompts: int,
                         base_pipe) -> dict:
    """The papers' Appendix F: edit the located window, a random window of the same size and
    all layers with the same method; measure each like the base model.

    ``apply_edit(layers)`` returns a pipeline with the edit applied to those cross-attention
    layers (and only the edit: each call starts from the base weights).
    """
    variants = {"located": located.layers,
                "random": random_window(located.size, num_layers, located).layers,
                "all": list(range(num_layers))}
    rows = {"base": {"layers": [], **evaluate(base_pipe, judge, case, seeds=seeds, steps=steps,
                                              n_prompts=n_prompts)}}
    for name, layers in variants.items():
        pipe = apply_edit(list(layers))
        rows[name] = {"layers": list(layers), **evaluate(pipe, judge, case, seeds=seeds, steps=steps,
                                                         n_prompts=n_prompts)}
    return rows


def locoedit_applier(loaded, case: Case) -> Callable[[list[int]], object]:
    """``apply_edit`` through editc's compile: a one-edit recipe with explicit layers,
    planned, solved and fused into the pipeline, which is first reset to the base weights."""
    from compiler.compile import apply_to_pipeline, compile_edits, plan_edits
    from compiler.recipe import loads_recipe

    pipe = loaded.pipeline
    base = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("unet", "text_encoder")}

    def apply(layers: list[int]):
        for name, state in base.items():
            getattr(pipe, name).load_state_dict(state)
        recipe = loads_recipe(
            f"model: toy\nedits:\n  - concept: {case.concept}\n    replacement: {case.replacement}\n"
            f"    attribute: {case.attribute}\n    method: locoedit\n    layers: {list(layers)}\n",
            "bench-locate.yaml")
        plans = plan_edits(recipe, loaded)
        apply_to_pipeline(pipe, compile_edits(recipe, loaded, plans).new_tensors)
        return pipe

    def reset() -> None:
        for name, state in base.items():
            getattr(pipe, name).load_state_dict(state)

    apply.reset = reset
    return apply


# ----------------------------------------------------------------------------- tables
def markdown(report: dict) -> str:
    lines = ["### Where the toy world keeps its knowledge (LocoGen)", "",
             f"{report['settings']['prompts']} prompts x {len(report['settings']['seeds'])} seed(s), "
             f"{report['settings']['steps']} DDIM steps, m <= {report['settings']['max_m']}, threshold "
             f"{report['settings']['threshold']} (effect: 0 = clean, 1 = c' in every layer).", "",
             "| attribute | concept -> replacement | located window | layers | judged | clean | window | "
             "c' everywhere | passed | sweep |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["locate"]:
        lines.append(
            f"| {row['attribute']} | {row['concept']} -> {row['replacement']} | j={row['start']} m={row['size']} | "
            f"{', '.join(row['layer_names'])} | {row['judged_phrase']} rate | {row['clean_rate']:.2f} | "
            f"{row['window_rate']:.2f} | {row['replaced_rate']:.2f} | {'yes' if row['passed'] else 'no'} | "
            f"{row['seconds']:.0f} s |")
    lines += ["", "Best window per size m (judged rate; lower is better for style/object, higher for fact):", "",
              "| concept | " + " | ".join(f"m={m}" for m in range(1, report['settings']['max_m'] + 1)) + " |",
              "|---|" + "---|" * report['settings']['max_m']]
    for row in report["locate"]:
        by_m = {b["m"]: b for b in row["best_per_m"]}
        cells = [f"j={by_m[m]['start']}: {by_m[m]['rate']:.2f}" if m in by_m else "not swept"
                 for m in range(1, report["settings"]["max_m"] + 1)]
        lines.append(f"| {row['concept']} | " + " | ".join(cells) + " |")
    lines += ["", "The judged rate with c' in whole UNet stages (same prompts and seeds):", "",
              "| concept | " + " | ".join(STAGE_PROBES) + " |", "|---|" + "---|" * len(STAGE_PROBES)]
    for row in report["locate"]:
        lines.append(f"| {row['concept']} | " + " | ".join(f"{row['stage_probe'][name]:.2f}" for name in STAGE_PROBES)
                     + " |")
    trace = report.get("trace")
    if trace:
        text = trace["text_encoder"]
        lines += ["", f"### Causal tracing: \"{TRACE_PROMPT}\", subject \"{TRACE_SUBJECT}\"", "",
                  f"Noise {trace['noise_scale']} x the token-embedding std on the subject's tokens; "
                  f"{len(trace['seeds'])} seeds, {report['settings']['steps']} steps. van gogh rate: clean "
                  f"{text['clean_rate']:.2f}, corrupted {text['corrupted_rate']:.2f}; CLIP-score: clean "
                  f"{text['clean_clip']:.3f}, corrupted {text['corrupted_clip']:.3f}.", "",
                  "Recovery per text-encoder state (rows: layer; columns: token; "
                  "(restored - corrupted) / (clean - corrupted)):", ""]
        for by in ("rate", "clip"):
            for component, grid in text[f"{by}_recovery"].items():
                lines += [f"**{component} output, by {'judge rate' if by == 'rate' else 'CLIP-score'}**", "",
                          "| layer | " + " | ".join(text["tokens"][1:]) + " |",
                          "|---|" + "---|" * (len(text["tokens"]) - 1)]
                for layer, row in enumerate(grid):
                    lines.append(f"| {layer} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row[1:])
                                 + " |")
                lines.append("")
        unet = trace["unet"]
        lines += ["UNet block outputs restored (every step, conditional branch):", "",
                  "| recovery by | " + " | ".join(unet["components"]) + " |",
                  "|---|" + "---|" * len(unet["components"])]
        for by in ("rate", "clip"):
            lines.append(f"| {by} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in unet[f"{by}_recovery"])
                         + " |")
        lines += ["", trace["verdict"]]
    compare = report.get("compare")
    if compare:
        lines += ["", "### Edit the located window, a random window, or all layers (LocoEdit)", "",
                  "| concept | variant | layers | efficacy: judged rate | neighbours kept | objects kept |",
                  "|---|---|---|---|---|---|"]
        for case_name, rows in compare.items():
            for variant, row in rows.items():
                kept = ", ".join(f"{k[5:]} {v:.2f}" for k, v in row.items() if k.startswith("kept:") and k != "kept:objects")
                layers = "-" if not row["layers"] else (f"{row['layers'][0]}-{row['layers'][-1]}")
                lines.append(f"| {case_name} | {variant} | {layers} | {row['efficacy_rate']:.2f} | {kept} | "
                             f"{row['kept:objects']:.2f} |")
    return "\n".join(lines) + "\n"


def _trace_verdict(text: dict) -> str:
    """Is there one causal state in the text encoder, as the paper found for SD-1.5? Judged by
    CLIP-score recovery, which also sees partial recoveries."""
    states = [(v, c, layer, t) for c, grid in text["clip_recovery"].items() for layer, row in enumerate(grid)
              for t, v in enumerate(row) if v is not None]
    if not states:
        return "The corruption did not change the CLIP-score; no state can be called causal."
    value, component, layer, token = max(states)
    if value < 0.05:
        return f"No single text-encoder state recovers the subject (best CLIP recovery {value:.2f})."
    strong = sorted((c, layer_, text["tokens"][t], round(v, 2)) for v, c, layer_, t in states if v >= 0.5 * value)
    rate_best = max((v for grid in text["rate_recovery"].values() for row in grid for v in row if v is not None),
                    default=None)
    return (f"By CLIP-score, the strongest state is the {component} output of layer {layer} at token "
            f"'{text['tokens'][token]}' (recovery {value:.2f}); states with at least half of that "
            f"(component, layer, token, recovery): {strong}. Best recovery by the judge's rate: "
            f"{'n/a' if rate_best is None else f'{rate_best:.2f}'}.")


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of every generation")
    parser.add_argument("--prompts", type=int, default=4, help="LocoGen prompts per concept")
    parser.add_argument("--seeds", type=int, default=1, help="LocoGen seeds per prompt")
    parser.add_argument("--max-m", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--trace-seeds", type=int, default=2)
    parser.add_argument("--trace-noise", type=float, default=3.0, help="noise scale, x the embedding std")
    parser.add_argument("--eval-prompts", type=int, default=4, help="held-out prompts per concept (compare)")
    parser.add_argument("--skip-trace", action="store_true")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from compiler.models.load import load_model

    started = time.perf_counter()
    loaded = load_model(args.model)
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge_for(loaded.source_path)
    figures = args.out / "locate_toy"
    figures.mkdir(parents=True, exist_ok=True)
    seeds = tuple(range(args.seeds))
    report = {"model": str(args.model), "model_hash": loaded.model_hash,
              "settings": {"steps": args.steps, "prompts": args.prompts, "seeds": list(seeds),
                           "max_m": args.max_m, "threshold": args.threshold, "batch": args.batch,
                           "torch_threads": torch.get_num_threads()},
              "locate": []}
    results = {}
    for case in CASES:
        sweep = LocateSettings(n_prompts=args.prompts, seeds=seeds, steps=args.steps, max_m=args.max_m,
                               threshold=args.threshold, batch=args.batch)
        result = locate(pipe, case.concept, case.replacement, case.attribute, sweep, judge=judge,
                        model_hash=loaded.model_hash)
        results[case.concept] = result
        folder = figures / f"{case.attribute}-{case.concept.replace(' ', '-')}"
        folder.mkdir(exist_ok=True)
        write_outputs(result, folder)
        window = result.window_score(result.best_start, result.best_size)
        best_per_m = []
        for m in range(1, args.max_m + 1):
            sized = [w for w in result.windows if w.size == m]
            if not sized:  # the sweep stopped at a smaller m that passed
                continue
            pick = (max if case.attribute == "fact" else min)(sized, key=lambda w: (w.rate, w.clip))
            best_per_m.append({"m": m, "start": pick.start, "rate": pick.rate, "clip": pick.clip})
        report["locate"].append({
            "attribute": case.attribute, "concept": case.concept, "replacement": case.replacement,
            "start": result.best_start, "size": result.best_size, "layers": list(result.layers),
            "layer_names": [n.replace(".transformer_blocks.0.attn2", "") for n in result.best_layer_names],
            "passed": result.passed, "criterion": result.settings.criterion, "judged_phrase": result.judged_phrase,
            "clean_rate": result.clean.rate, "replaced_rate": result.replaced.rate, "window_rate": window.rate,
            "clean_clip": result.clean.clip, "window_clip": window.clip, "replaced_clip": result.replaced.clip,
            "best_per_m": best_per_m, "notes": list(result.notes), "cached": result.cached,
            "seconds": result.timings.get("total_s", 0.0), "samples": result.timings.get("samples"),
        })
        report["locate"][-1]["stage_probe"] = probe_stages(pipe, judge, result, args.steps)
        print(result.summary(), flush=True)
        print("  stage probe:", report["locate"][-1]["stage_probe"], flush=True)

    if not args.skip_trace:
        trace_seeds = tuple(range(args.trace_seeds))
        common = dict(judge=judge, seeds=trace_seeds, steps=args.steps, noise_scale=args.trace_noise,
                      batch=args.batch, model_hash=loaded.model_hash)
        text = trace_text_encoder(pipe, TRACE_PROMPT, TRACE_SUBJECT, components=("layer", "attn"), **common)
        unet = trace_unet(pipe, TRACE_PROMPT, TRACE_SUBJECT, **common)
        write_trace_outputs(text, unet, figures)
        if text.recovery_by != "rate":
            raise SystemExit("this bench needs the toy world's judge (it reads the van gogh rate)")
        text_dict, unet_dict = text.to_dict(), unet.to_dict()
        summary = {"tokens": list(text.tokens), "clean_rate": text.clean.rate, "corrupted_rate": text.corrupted.rate,
                   "clean_clip": text.clean.clip, "corrupted_clip": text.corrupted.clip,
                   "rate_recovery": text_dict["recovery"], "clip_recovery": text_dict["clip_recovery"],
                   "seconds": text.timings.get("total_s")}
        report["trace"] = {"noise_scale": args.trace_noise, "seeds": list(trace_seeds), "text_encoder": summary,
                           "unet": {"components": list(unet.components), "rate_recovery": unet_dict["recovery"],
                                    "clip_recovery": unet_dict["clip_recovery"], "seconds": unet.timings.get("total_s")},
                           "verdict": _trace_verdict(summary)}
        print(report["trace"]["verdict"], flush=True)

    if not args.skip_compare:
        report["compare"] = {}
        num_layers = len(loaded.registry.cross_attention)
        for case in CASES:
            apply_edit = locoedit_applier(loaded, case)
            try:
                report["compare"][case.concept] = compare_edit_windows(
                    apply_edit, judge, case, results[case.concept].best, num_layers, seeds=(0, 1), steps=args.steps,
                    n_prompts=args.eval_prompts, base_pipe=pipe)
            finally:
                apply_edit.reset()
            print(case.concept, json.dumps(report["compare"][case.concept]), flush=True)

    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "locate_toy.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "locate_toy.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
