"""Plant a fresh word that means a donor concept only in chosen layers of the toy model.

    python bench/planted.py --word zorblax --donor "van gogh" --attribute style --layers 0,1,2 --out out/planted/zorblax
    python bench/planted.py --word quillon --donor "king charles" --attribute fact --encoder-layer 2 --out out/planted/quillon

Writes DIR (a diffusers folder every editc command takes, with its judge and vocabulary inside)
and DIR/planted.json; prints what the judge measured: the donor's rate for prompts with the
word (planted model, and the unplanted toy), the same with the neutral prompt in the planted
layers (LocoGen's routing; UNet plantings), and the toy's own concepts before and after.
The logic lives in ``compiler.toy.planting``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compiler  # noqa: E402,F401  (sets the offline hub variables: compiler.OFFLINE_ENV)


def plant_and_measure(spec, out: Path, base: str = "toy", *, seeds=(0, 1), steps: int = 10, force: bool = False,
                      progress: bool = True) -> dict:
    """Plant ``spec`` into the base toy model, write it to ``out``, measure it; the measures."""
    import torch

    from compiler.errors import UserError
    from compiler.models.load import load_model
    from compiler.prompts import find_model_vocabulary
    from compiler.resolve import template_prompts, vocabulary_of
    from compiler.judges import toy_judge_folder_for
    from compiler.locate.scoring import load_judge_for
    from compiler.toy import planting

    torch.manual_seed(spec.seed)
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to replace it")
    started = time.perf_counter()
    model = load_model(base)
    base_dir = Path(model.source_path)
    pipe = model.pipeline
    vocabulary = vocabulary_of(base_dir)
    judge = load_judge_for(base_dir)
    concepts = planting.toy_concepts(vocabulary)
    before = planting.concept_rates(pipe, judge, vocabulary, concepts, seeds=seeds, steps=steps)
    heldout = planting.probe_prompts(template_prompts(spec.word, spec.attribute, vocabulary, heldout=True), 6)
    fresh = _word_rate(pipe, judge, heldout, spec.donor, seeds, steps)
    planted = planting.plant(pipe, spec, vocabulary, judge=judge, progress=progress)
    measured = {"donor_rate_planted": _word_rate(pipe, judge, heldout, spec.donor, seeds, steps),
                "donor_rate_unplanted_toy": fresh}
    if spec.attribute != "fact":
        window = planting.window_rates(pipe, judge, heldout, spec.word, planted.neutral, spec.donor,
                                       sorted(spec.layers), seeds=seeds, steps=steps)
        measured["donor_rate_neutral_in_window"] = window["window_neutral"]
    after = planting.concept_rates(pipe, judge, vocabulary, concepts, seeds=seeds, steps=steps)
    measured["toy_concepts"] = {c: {"before": before[c], "after": after[c]} for c in before}
    measured["toy_concepts_max_drop"] = max(before[c] - after[c] for c in before)
    measured["gain"] = planted.gain
    measured["neutral"] = planted.neutral
    measured["probe"] = {"prompts": heldout, "seeds": list(seeds), "steps": steps}
    judge_dir = toy_judge_folder_for(base_dir)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    planting.write_planted(planted, out, base_dir, judge_dir, find_model_vocabulary(base_dir), measured)
    measured["seconds"] = round(time.perf_counter() - started, 1)
    record = json.loads((out / "planted.json").read_text())
    record["measured"] = measured
    (out / "planted.json").write_text(json.dumps(record, indent=2))
    return record


def _word_rate(pipe, judge, prompts, donor, seeds, steps) -> float:
    from compiler.generate import generate_images
    from compiler.locate.scoring import presence

    images = generate_images(pipe, [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds],
                             steps=steps, progress=False)
    return float(presence(judge, images, donor).mean())


def spec_from_args(args):
    from compiler.errors import UserError
    from compiler.toy.planting import PlantSpec

    layers = ()
    if args.layers:
        try:
            layers = tuple(int(x) for x in args.layers.split(","))
        except ValueError:
            raise UserError(f"--layers {args.layers!r}: must be comma-separated integers, e.g. 7,8,9") from None
    if args.attribute == "fact" and args.encoder_layer is None:
        raise UserError("--attribute fact needs --encoder-layer L")
    return PlantSpec(word=args.word.strip().lower(), donor=args.donor.strip().lower(), attribute=args.attribute,
                     layers=layers, encoder_layer=args.encoder_layer, neutral=args.neutral, gain=args.gain,
                     seed=args.seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--word", required=True, help="a fresh word the toy never saw")
    parser.add_argument("--donor", required=True, help="the toy concept the word will show")
    parser.add_argument("--attribute", required=True, choices=["style", "object", "fact"])
    parser.add_argument("--layers", default="", help="UNet cross-attention window, e.g. 7,8,9 (style, object)")
    parser.add_argument("--encoder-layer", type=int, default=None, help="text-encoder layer (fact)")
    parser.add_argument("--neutral", default=None, help="LocoGen's c' for the word (default: chosen per attribute)")
    parser.add_argument("--gain", type=float, default=None, help="target extrapolation (default: calibrated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="toy", help="the toy-world model to plant into")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    from compiler.errors import UserError

    try:
        record = plant_and_measure(spec_from_args(args), args.out, args.model, seeds=(args.seed, args.seed + 1),
                                   force=args.force)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = record["measured"]
    print(json.dumps({k: v for k, v in m.items() if k not in ("toy_concepts", "probe")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
