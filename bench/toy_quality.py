"""How good is the toy world? The judge on held-out renders, and generated images by the judge.

    python bench/toy_quality.py [--seeds 8] [--steps 25]

Writes ``bench/results/toy_quality.json`` and prints a Markdown table. Targets (issue 3): the
judge's zero-shot accuracy >= 95 % for object, colour and style on held-out rendered images;
generated images match the prompt's object >= 90 %, colour >= 90 %, style >= 80 %, and show the
fact's person >= 80 %.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from compiler.toy import world
from compiler.toy.render import render

RESULTS = Path(__file__).resolve().parent / "results"


def judge_on_renders(judge, n: int = 2000, seed: int = 1234) -> dict:
    """Zero-shot accuracy on freshly rendered images of random scenes (never trained on)."""
    rng = random.Random(seed)
    scenes = [world.sample(rng, world.HELDOUT_PREFIXES).scene for _ in range(n)]
    images = np.stack([render(s, 10**9 + seed * n + i) for i, s in enumerate(scenes)])
    got = judge.classify(images)
    objects = [i for i, s in enumerate(scenes) if s.kind == "object"]
    return {
        "n": n,
        "identity": float(np.mean([got[i].identity == scenes[i].identity for i in range(n)])),
        "colour": float(np.mean([got[i].colour == scenes[i].colour for i in objects])),
        "style": float(np.mean([got[i].style == scenes[i].style for i in range(n)])),
    }


def generation_prompts() -> list[tuple[str, world.Scene]]:
    """Every object in every colour (styles cycled), the characters, the people and the facts."""
    styles = (None, *world.STYLES)
    out = []
    k = 0
    for obj in world.OBJECTS:
        for colour in world.COLOURS:
            scene = world.Scene(obj, colour, styles[k % len(styles)])
            out.append((world.caption(scene), scene))
            k += 1
    for name in (*world.CHARACTERS, *world.PEOPLE):
        for style in (None, styles[1 + k % 5]):
            scene = world.Scene(name, None, style)
            out.append((world.caption(scene), scene))
            k += 1
    for title, person in world.FACTS.items():
        for style in (None, "monet"):
            scene = world.Scene(person, None, style)
            out.append((world.caption(scene, title=title), scene))
    return out


def judge_on_generations(pipe, judge, seeds: int, steps: int) -> dict:
    from compiler.generate import generate_images

    prompts = generation_prompts()
    texts = [t for t, _ in prompts for _ in range(seeds)]
    scenes = [s for _, s in prompts for _ in range(seeds)]
    seed_list = [k for _ in prompts for k in range(seeds)]
    t0 = time.perf_counter()
    images = generate_images(pipe, texts, seed_list, steps=steps, guidance=4.0)
    seconds = time.perf_counter() - t0
    got = judge.classify(images)
    facts = [i for i, t in enumerate(texts) if any(title in t for title in world.FACTS)]
    objects = [i for i, s in enumerate(scenes) if s.kind == "object"]
    subjects = [i for i in range(len(texts)) if i not in set(facts)]
    return {
        "images": len(texts),
        "seconds": round(seconds, 1),
        "object": float(np.mean([got[i].identity == scenes[i].identity for i in subjects])),
        "colour": float(np.mean([got[i].colour == scenes[i].colour for i in objects])),
        "style": float(np.mean([got[i].style == scenes[i].style for i in range(len(texts))])),
        "fact_person": float(np.mean([got[i].identity == scenes[i].identity for i in facts])),
        # Where objects go wrong: accuracy per painting style of the prompt.
        "object_by_style": {
            str(style or "plain"): float(np.mean([got[i].identity == scenes[i].identity for i in subjects
                                                  if scenes[i].style == style]))
            for style in (None, *world.STYLES)
        },
    }, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--model", default="toy")
    args = parser.parse_args()
    from compiler.models.load import load_model
    from compiler.toy.judge import load_judge

    judge = load_judge()
    pipe = load_model(args.model).pipeline
    pipe.set_progress_bar_config(disable=True)
    renders = judge_on_renders(judge)
    gens, images = judge_on_generations(pipe, judge, args.seeds, args.steps)
    result = {"judge_on_heldout_renders": renders, "generated": gens, "seeds_per_prompt": args.seeds,
              "steps": args.steps, "guidance": 4.0}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "toy_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    from PIL import Image

    from compiler.generate import image_grid

    Image.fromarray(image_grid(images[:: args.seeds][:72], cols=12, scale=3)).save(RESULTS / "toy_generations.png")
    print("| measure | target | measured |\n|---|---|---|")
    print(f"| judge, held-out renders: object | >= 95 % | {renders['identity']:.1%} |")
    print(f"| judge, held-out renders: colour | >= 95 % | {renders['colour']:.1%} |")
    print(f"| judge, held-out renders: style | >= 95 % | {renders['style']:.1%} |")
    print(f"| generated: object | >= 90 % | {gens['object']:.1%} |")
    print(f"| generated: colour | >= 90 % | {gens['colour']:.1%} |")
    print(f"| generated: style | >= 80 % | {gens['style']:.1%} |")
    print(f"| generated: fact's person | >= 80 % | {gens['fact_person']:.1%} |")


if __name__ == "__main__":
    main()
