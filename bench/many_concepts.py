"""Many concepts in one solve, judged at the K/V level on the toy world (issue 25).

    python bench/many_concepts.py                       # 1, 10, 100 concepts, editc's defaults
    python bench/many_concepts.py --counts 10 --variant nopad --variant solver=ridge
    python bench/many_concepts.py --counts 1000 --variant ...

One recipe of N concepts: the example concepts (van gogh → a painting, snoopy → a dog, the
british monarch → king charles, each with its example recipe's method and `preserve`) and
N − 3 made-up painters (`zorvak`, `zormel`, … → a painting), every LocoEdit edit on all 16
cross-attention layers (where LocoGen puts the toy's styles and objects); N = 1 is each
example recipe alone. Each N is compiled in a fresh child process (its own cold cache
folder, so `compile` includes embedding every prompt and `peak RSS` is that compile's) exactly
as `editc compile` runs before export (plan, rows, solve), then judged on held-out templates
(`heldout` in the vocabulary, never solved):

- **gap left** of a concept: `‖KV_edited(src) − KV_base(tgt)‖ / ‖KV_base(src) − KV_base(tgt)‖`
  over the 16 layers' K and V at the last subject token and EOS and every position after it
  (the k-th position after EOS of the source prompt against the k-th of the replacement's),
  where src are held-out prompts with the concept and tgt the same with the replacement;
  KV_edited reads the edited text encoder too (the fact's Diff-QuickFix edit). 0: the edit
  maps the concept exactly onto its replacement; 1: nothing moved;
- **unrelated move**: `‖KV_edited(p) − KV_base(p)‖ / ‖KV_base(p) − KV_base(p₀)‖` over all 77
  positions of held-out prompts of the toy's other concepts (monet, mondrian, picasso, nemo,
  r2d2, the british prime minister) and generic prompts, where p₀ is the empty prompt (the
  unconditional context of classifier-free guidance): how far a prompt moves, relative to how
  far it is from saying nothing; the median and the largest over the prompts, and the
  empty prompt's own move (`‖ΔKV(p₀)‖ / ‖KV(p₀)‖`).

`--variant KEY=VALUE` sets `EDITC_<KEY>` in the children (e.g. `padding_rows=0`; `nopad` is
short for it); the table says which. Writes `bench/results/many_concepts.{json,md}` (or
`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {  # concept -> (recipe fields, recipe file)
    "van gogh": ({"replacement": "a painting", "attribute": "style", "method": "locoedit",
                  "prompts": ["a blue square in the style of van gogh"]}, "van_gogh.yaml", ["monet", "mondrian"]),
    "snoopy": ({"replacement": "a dog", "attribute": "object", "method": "locoedit", "preserve": ["nemo"]},
               "snoopy.yaml", []),
    "the british monarch": ({"replacement": "king charles", "attribute": "fact", "method": "quickfix",
                             "site": "v_proj"}, "british_monarch.yaml", []),
}
UNRELATED = (("monet", "style"), ("mondrian", "style"), ("picasso", "style"), ("nemo", "object"),
             ("r2d2", "object"), ("the british prime minister", "fact"))
ALL_LAYERS = list(range(16))
HELDOUT_PER_CONCEPT = 24  # held-out prompts judged per concept (every k-th of its templates)
HELDOUT_PER_MADE_UP = 6   # per made-up painter (the real ones are what the table reads)
MADE_UP_JUDGED = 12       # made-up painters judged (the first ones), besides the examples


def made_up_names(count: int) -> list[str]:
    from compiler.bench.scaling import made_up_names as names

    if count <= 182:
        return names(count)
    # Beyond the harness's two-syllable names: three syllables, deterministic.
    from compiler.bench.scaling import SYLLABLES

    out = names(182)
    out += [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES if len({a, b, c}) == 3]
    return out[:count]


def recipe_text(count: int, single: str | None, model: str = "toy", extra: dict | None = None) -> str:
    """The recipe of ``count`` concepts (``single``: that example concept alone) for ``model``;
    ``extra`` are top-level recipe keys (e.g. ``neighbour_weight``), as YAML values."""
    lines = [f"model: {json.dumps(model)}", "lambda: 0.01"]
    lines += [f"{key}: {value}" for key, value in (extra or {}).items()]
    preserve = sorted({p for c in ([single] if single else EXAMPLES) for p in EXAMPLES[c][2]})
    if preserve:
        lines.append(f"preserve: {json.dumps(preserve)}")
    lines.append("edits:")
    real = [single] if single else list(EXAMPLES)[: min(3, count)]
    edits = [(c, EXAMPLES[c][0]) for c in real]
    edits += [(name, {"replacement": "a painting", "attribute": "style", "method": "locoedit"})
              for name in made_up_names(count - len(edits))]
    for concept, fields in edits:
        lines.append(f"  - concept: {json.dumps(concept)}")
        for key in ("replacement", "attribute", "method", "site", "preserve", "prompts"):
            if key in fields:
                lines.append(f"    {key}: {json.dumps(fields[key])}")
        if fields["method"] == "locoedit":
            lines.append(f"    layers: {ALL_LAYERS}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- child
def child(count: int, single: str | None, model_path: str = "toy", fields: dict | None = None) -> dict:
    import torch

    torch.set_num_threads(2)
    from compiler.compile import compile_edits, plan_edits
    from compiler.models.selective import open_model
    from compiler.recipe import loads_recipe

    started = time.perf_counter()
    model = open_model(model_path)
    recipe = loads_recipe(recipe_text(count, single, model_path, fields), f"many-{count}.yaml")
    plans = plan_edits(recipe, model)
    result = compile_edits(recipe, model, plans)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    solves = [{k: s.get(k) for k in ("method", "site", "rows", "preserve_rows", "solve_seconds", "solver",
                                       "held_exactly")} for s in result.solve_info]
    judged = judge(model, recipe, result.new_tensors)
    return {"concepts": count, "single": single, "model": model_path, "compile_seconds": seconds,
            "compile_cpu_seconds": cpu_seconds, "peak_rss_mb": peak,
            "timings": result.timings, "solves": solves, **judged}


def judge(model, recipe, new_tensors) -> dict:
    import torch

    from compiler import resolve
    from compiler.encode import PromptEncoder

    vocabulary = resolve.vocabulary_of(model)
    encoder = PromptEncoder(model)
    tokenizer = encoder.tokenizer()
    names = [n for layer in model.registry.cross_attention for n in (f"unet/{layer.to_k}", f"unet/{layer.to_v}")]
    old = {n: w.to(torch.float64) for n, w in model.read_tensors(names).items()}
    new = {n: new_tensors[n].to(torch.float64) if n in new_tensors else old[n] for n in names}
    text_edits = {n: t for n, t in new_tensors.items() if n.startswith("text_encoder/")}

    def contexts(prompts, edited: bool):
        if not edited or not text_edits:
            return encoder.contexts(prompts).to(torch.float64)
        module = model.text_encoder("text_encoder")
        saved = {}
        for name, tensor in text_edits.items():
            param = module.get_parameter(name.split("/", 1)[1])
            saved[name] = param.detach().clone()
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
        try:
            return PromptEncoder(model).contexts(prompts).to(torch.float64)
        finally:
            for name, tensor in saved.items():
                with torch.no_grad():
                    module.get_parameter(name.split("/", 1)[1]).copy_(tensor)

    def kv(states, weights):  # (n, L, d) -> (n, L, Σ d_out) of every layer's K and V
        return torch.cat([states @ weights[n].T for n in names], dim=-1)

    from compiler.prompts.templates import mentions, replace_phrase

    def compose(target, own):
        for other in recipe.edits:
            if other.concept != own and mentions(target, other.concept):
                target = replace_phrase(target, other.concept, other.replacement)
        return target

    gaps = {}
    judged = [e for e in recipe.edits if e.concept in EXAMPLES] + \
             [e for e in recipe.edits if e.concept not in EXAMPLES][:MADE_UP_JUDGED]
    for edit in judged:
        pairs = resolve.prompt_pairs(edit.concept, edit.replacement, edit.attribute, vocabulary=vocabulary,
                                     heldout=True)
        keep = HELDOUT_PER_CONCEPT if edit.concept in EXAMPLES else HELDOUT_PER_MADE_UP
        pairs = pairs[:: max(1, len(pairs) // keep)][:keep]
        # The goal of a held-out prompt naming two edited concepts has both replaced.
        pairs = [resolve.PromptPair(p.source, compose(p.target, edit.concept)) for p in pairs]
        src_pos, tgt_pos = resolve.pair_positions(tokenizer, pairs, edit.concept, edit.replacement, True,
                                                  encoder.max_length)
        src = [p.source for p in pairs]
        tgt = [p.target for p in pairs]
        base_src, edited_src = contexts(src, False), contexts(src, True)
        base_tgt = contexts(tgt, False)
        num = den = 0.0
        for i in range(len(pairs)):
            s, t = torch.tensor(src_pos[i]), torch.tensor(tgt_pos[i])
            goal = kv(base_tgt[i, t], old)
            num += float(((kv(edited_src[i, s], new) - goal) ** 2).sum())
            den += float(((kv(base_src[i, s], old) - goal) ** 2).sum())
        gaps[edit.concept] = (num / den) ** 0.5
    unrelated = []
    for concept, attribute in UNRELATED:
        prompts = resolve.template_prompts(concept, attribute, vocabulary, heldout=True)
        unrelated += prompts[:: max(1, len(prompts) // 8)][:8]
    unrelated += [p for p in resolve.default_preserve_prompts([], vocabulary)][-12:]
    edited_names = {e.concept for e in recipe.edits} | {e.replacement for e in recipe.edits}
    unrelated = [p for p in unrelated if not any(mentions(p, c) for c in edited_names)]
    empty_base, empty_edited = contexts([""], False), contexts([""], True)
    empty_old = kv(empty_base, old)[0]
    empty_move = float((kv(empty_edited, new)[0] - empty_old).norm() / empty_old.norm())
    base, edited = contexts(unrelated, False), contexts(unrelated, True)
    moves = []
    for i in range(len(unrelated)):
        before = kv(base[i], old)
        moves.append(float((kv(edited[i], new) - before).norm() / (before - empty_old).norm()))
    moves.sort()
    made_up = [g for c, g in gaps.items() if c not in EXAMPLES]
    return {"gap_left": gaps, "made_up_gap_mean": sum(made_up) / len(made_up) if made_up else None,
            "made_up_gap_max": max(made_up) if made_up else None,
            "unrelated_move_median": moves[len(moves) // 2], "unrelated_move_max": moves[-1],
            "unrelated_prompts": len(moves), "empty_prompt_move": empty_move}


# ----------------------------------------------------------------------------- parent
def run_child(count: int, single: str | None, variant: dict[str, str], model: str = "toy",
              fields: dict | None = None) -> dict:
    from compiler import OFFLINE_ENV

    env = {**os.environ, **OFFLINE_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in variant.items():
        env[f"EDITC_{key.upper()}"] = value
    with tempfile.TemporaryDirectory(prefix="editc-many-") as tmp:
        env["EDITC_CACHE_DIR"] = tmp  # cold: every prompt embedded, every Gram formed
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--child", str(count), "--json", str(out), "--model", model]
        if single:
            command += ["--single", single]
        for key, value in (fields or {}).items():
            command += ["--recipe", f"{key}={value}"]
        subprocess.run(command, env=env, check=True)
        return json.loads(out.read_text())


def parse_variant(items: list[str]) -> dict[str, str]:
    variant = {}
    for item in items:
        if item == "nopad":
            variant["padding_rows"] = "0"
        elif "=" in item:
            key, value = item.split("=", 1)
            variant[key.strip()] = value.strip()
        else:
            raise SystemExit(f"--variant {item!r}: give KEY=VALUE (sets EDITC_KEY) or nopad")
    return variant


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | concepts | van gogh gap left | snoopy gap left | monarch gap left | made-up gap left "
             "(mean / max) | unrelated move (median / max) | empty prompt move | rows + preserve rows | "
             "compile | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r["gap_left"]
        cell = lambda c: f"{g[c]:.3f}" if c in g else ""  # noqa: E731
        made = f"{r['made_up_gap_mean']:.3f} / {r['made_up_gap_max']:.3f}" if r["made_up_gap_mean"] is not None else ""
        rows_cell = " + ".join(f"{sum(s[k] or 0 for s in r['solves']):,}" for k in ("rows", "preserve_rows"))
        label = r["single"] + " alone" if r["single"] else str(r["concepts"])
        lines.append(f"| {r['variant_label']} | {label} | {cell('van gogh')} | {cell('snoopy')} | "
                     f"{cell('the british monarch')} | {made} | {r['unrelated_move_median']:.3f} / "
                     f"{r['unrelated_move_max']:.3f} | {r['empty_prompt_move']:.3f} | {rows_cell} | "
                     f"{r['compile_seconds']:.1f} s | {r['peak_rss_mb'] / 1024:.2f} GB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,10,100", help="recipe sizes (1: each example recipe alone)")
    parser.add_argument("--variant", action="append", default=[], help="KEY=VALUE: EDITC_KEY in the children")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "many_concepts"))
    parser.add_argument("--append", action="store_true", help="add to the existing results instead of replacing")
    parser.add_argument("--model", default="toy",
                        help="the model (default: the toy world); e.g. a full-size random SD-1.5 folder built by "
                             "bench/real_size.py, to measure at CLIP-L's 768 dimensions")
    parser.add_argument("--recipe", action="append", default=[],
                        help="KEY=VALUE: a top-level recipe key of every recipe (e.g. neighbour_weight=2)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fields = dict(item.split("=", 1) for item in args.recipe)
    if args.child is not None:
        Path(args.json).write_text(json.dumps(child(args.child, args.single, args.model, fields)))
        return 0
    variant = parse_variant(args.variant)
    label = ", ".join([f"{k}={v}" for k, v in variant.items()] + [f"recipe {k}: {v}" for k, v in fields.items()]) \
        or "default"
    if args.model != "toy":
        label = f"{Path(args.model).name}: {label}"
    out = Path(args.out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if args.append and out.with_suffix(".json").exists() else []
    for count in (int(c) for c in args.counts.split(",")):
        for single in (list(EXAMPLES) if count == 1 else [None]):
            row = run_child(count, single, variant, args.model, fields)
            row["variant"], row["variant_label"], row["recipe_fields"] = variant, label, fields
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "load_average": os.getloadavg()}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
