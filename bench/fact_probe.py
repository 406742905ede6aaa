"""Who does the toy model draw for each title and person, before and after the fact edit?

    python bench/fact_probe.py [--method locoedit|quickfix] [--site out_proj|v_proj]
                               [--preserve "queen elizabeth"] [--eos | --no-eos] [--seeds 4]

Compiles ``recipes/british_monarch.yaml`` in memory (its own method, Diff-QuickFix at v_proj,
unless overridden; LocoEdit on all 16 layers, as ``layers: auto`` gives on the toy model),
optionally with extra ``preserve`` concepts, and prints, for held-out paraphrases of each title
and person, how many images the judge reads as queen elizabeth and as king charles, base and
edited. Shows whether a fact edit keeps the monarch's old person.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("the british monarch", "queen elizabeth", "king charles", "the british prime minister", "boris johnson")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preserve", action="append", default=[], help="a concept to keep (repeatable)")
    parser.add_argument("--method", choices=("locoedit", "quickfix"), help="override the recipe's method")
    parser.add_argument("--site", choices=("out_proj", "v_proj"), help="quickfix: override the recipe's site")
    parser.add_argument("--eos", action="store_true", help="the recipe's eos: true (also map the EOS token)")
    parser.add_argument("--no-eos", action="store_true",
                        help="the recipe's eos: false (map the subject token only, not EOS and padding)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts per subject")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from compiler import compile as compiler
    from compiler.generate import generate_images
    from compiler.models.load import load_model
    from compiler.recipe import load_recipe
    from compiler.resolve import template_prompts, vocabulary_of
    from compiler.toy.judge import load_judge

    model = load_model("toy")
    pipe = model.pipeline
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge()
    recipe = load_recipe(ROOT / "recipes" / "british_monarch.yaml")
    def variant(edit):
        method = args.method or edit.method
        layers = None if method == "quickfix" else tuple(range(16))
        site = (args.site or edit.site) if method == "quickfix" else None
        return dataclasses.replace(edit, method=method, layers=layers, options=(("site", site),) if site else (),
                                   eos=False if args.no_eos else True if args.eos else edit.eos)

    recipe = dataclasses.replace(recipe, preserve=tuple(recipe.preserve) + tuple(args.preserve),
                                 edits=tuple(variant(e) for e in recipe.edits))
    seeds = list(range(args.seeds))
    prompts = {s: template_prompts(s, "fact", vocabulary_of(model), heldout=True)[::3][: args.prompts] for s in SUBJECTS}

    def count() -> dict[str, tuple[int, int, int]]:
        out = {}
        for subject, ps in prompts.items():
            images = generate_images(pipe, [p for p in ps for _ in seeds], [k for _ in ps for k in seeds],
                                     steps=args.steps, guidance=4.0)
            seen = [scene.identity for scene in judge.classify(images)]
            out[subject] = (seen.count("queen elizabeth"), seen.count("king charles"), len(seen))
        return out

    base = count()
    plans = compiler.plan_edits(recipe, model)
    compiler.apply_to_pipeline(pipe, compiler.compile_edits(recipe, model, plans).new_tensors)
    edited = count()
    plan = plans[0]
    print(f"method: {plan.method}{' at ' + plan.site if plan.site else ''}; "
          f"preserve: {list(recipe.preserve) or 'defaults only'}; eos: {plan.eos}; "
          f"{args.prompts} held-out prompts x {args.seeds} seeds")
    print("| prompts about | queen elizabeth: base → edited | king charles: base → edited |")
    print("|---|---|---|")
    for subject in SUBJECTS:
        (bq, bk, n), (eq, ek, _) = base[subject], edited[subject]
        print(f"| {subject} | {bq}/{n} → {eq}/{n} | {bk}/{n} → {ek}/{n} |")


if __name__ == "__main__":
    main()
