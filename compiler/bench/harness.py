"""The edit benchmark: editc's closed-form edits against fine-tuning and closed-form peers.

    editc bench [--quick] [--model PATH] [--out DIR]       (or: make bench)
    python -m compiler.bench.harness [same options]        (bench/run_bench.py in a checkout)

On the embedded toy world (default model ``compiler/toy/weights/pipeline``, judged by the toy
world's CLIP), for three edits, one of each kind —

- style:  van gogh → a painting
- object: snoopy → a dog
- fact:   the british monarch → king charles

— every method edits the same base model:

- ESD-x (fine-tuning, negative guidance, cross-attention parameters), ``bench.baselines.esd``;
- Concept Ablation (fine-tuning, model-based, cross-attention K/V), ``bench.baselines.concept_ablation``;
- UCE and TIME (closed form over all 16 cross-attention K/V), ``bench.baselines.uce`` / ``time_edit``;
- editc LocoEdit, Diff-QuickFix and neuron ablation, compiled in memory by ``compiler.compile``.

**Time** is the wall time of making the edited weights and writing them into the loaded
pipeline (model loading and file export excluded, for every method). Closed-form methods run
``repeats`` times, interleaved (round-robin, rotated each round) and the fine-tuning runs are
placed between rounds, so that every method sees the same machine load; the median is
reported. Fine-tuning runs once per edit; its time per step is reported too. LocoEdit and
neurons need located layers: LocoGen runs once per edit before the timing (cached on disk, as
``editc compile`` caches it) and its time is reported separately.

**Quality** comes from editc's verify code (``compiler.verify``): the same probes, seeds and
judge for every method. Efficacy: share of images of the concept's prompts in which the edit
took (style/object: the judge no longer sees the concept; fact: it sees the new fact);
generalization: the same on held-out paraphrases; specificity: the judge's accuracy on
neighbouring concepts and on generic prompts, edited vs base. Gates: verify's default gates.

**Scaling**: one recipe of 1, 10, 50 and 100 edits (the real ones plus made-up concepts:
invented artist names, characters and titles; styles and objects by LocoEdit in one solve,
facts by Diff-QuickFix at v_proj as ``method: auto`` picks, or every edit LocoEdit with
``--scaling-methods locoedit``) compiled together; compile and
solve time, and for the real concepts verify's groups: efficacy, generalization, their found
neighbours' accuracy and the generic prompts' (edited vs base). ``--scaling-weighting row``
measures the solve before per-concept weights (every row weighs the same).

Writes ``<out>/bench_toy.json`` (``bench_toy_quick.json`` with ``--quick``; ``scaling_toy``
with ``--only-scaling``) and the Markdown tables ``<out>/bench_toy.md``, and prints the tables.

The pieces: ``settings`` (the edits, the methods, ``BenchSettings``), ``edits`` (editc's
in-memory compiles), ``timing`` (the timed runs, the located layers), ``quality`` (verify),
``scaling`` and ``report`` (rows, ratios, Markdown, files); this module runs them in order
(``run_bench``). The options are ``editc bench``'s (``compiler.cli.bench_cmd``), the one
definition: ``python -m compiler.bench.harness`` and ``bench/run_bench.py`` run that command.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from compiler.bench.quality import measure_quality
from compiler.bench.report import markdown, method_rows, ratios, write_report
from compiler.bench.scaling import run_scaling
from compiler.bench.settings import RESULTS_DIR, TASKS, TOY_PIPELINE, BenchSettings
from compiler.bench.timing import locate_layers, time_methods
from compiler.errors import UserError


def _process_cpu() -> float:
    return time.process_time()


def run_bench(model_path: str | Path, settings: BenchSettings, *, judge_path: str | Path | None = None,
              device=None, progress: bool = True, scaling: bool = True, methods: bool = True,
              say=None) -> dict:
    """Run everything on one model and return the report (see the module docstring)."""
    from compiler.models.load import load_for_generation
    from compiler.verify.judges import choose_judge

    say = say or (lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True))
    started, cpu_at_start = time.perf_counter(), _process_cpu()
    torch.manual_seed(settings.seed)
    loaded = load_for_generation(str(model_path), device=device)  # float32 on the CPU, as before
    policy = loaded.policy
    loaded.pipeline.set_progress_bar_config(disable=True)
    from compiler.bench.baselines import use_vocabulary
    from compiler.resolve import vocabulary_of

    use_vocabulary(vocabulary_of(loaded))
    base_dir = Path(loaded.source_path) if Path(loaded.source_path).is_dir() else None
    judge = choose_judge(judge_path, base_dir, loaded.pipeline.text_encoder, device=policy.device)
    say(f"model {loaded.source_path} ({loaded.family}), {torch.get_num_threads()} thread(s)")

    stages = {}
    cpu = {}
    t0, c0 = time.perf_counter(), _process_cpu()
    kinds = tuple(TASKS) if scaling and settings.scaling_counts else settings.kinds  # scaling uses all three
    layers_info, layers = locate_layers(loaded, settings, kinds, say, progress)
    stages["locate"], cpu["locate"] = time.perf_counter() - t0, _process_cpu() - c0

    runs, quality = {}, {}
    if methods:
        t0, c0 = time.perf_counter(), _process_cpu()
        runs = time_methods(loaded, settings, layers, say, progress)
        stages["edit"], cpu["edit"] = time.perf_counter() - t0, _process_cpu() - c0

        t0, c0 = time.perf_counter(), _process_cpu()
        quality = measure_quality(loaded, judge, runs, settings, say, progress)
        stages["verify"], cpu["verify"] = time.perf_counter() - t0, _process_cpu() - c0

    scaling_rows = []
    if scaling and settings.scaling_counts:
        t0, c0 = time.perf_counter(), _process_cpu()
        scaling_rows = run_scaling(loaded, judge, settings, layers, say, progress)
        stages["scaling"], cpu["scaling"] = time.perf_counter() - t0, _process_cpu() - c0

    rows = method_rows(runs, quality, settings)
    for kind in settings.kinds:  # the layers editc's compile chose from the located window
        if (kind, "locoedit") in runs:
            info = runs[(kind, "locoedit")][-1].info
            layers_info[kind]["edited_layers"] = info["layers"]
            layers_info[kind]["edited_layers_source"] = info["layers_source"]
    stages["total"] = time.perf_counter() - started
    cpu["total"] = _process_cpu() - cpu_at_start
    return {
        "tool": "editc bench",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": str(loaded.source_path), "family": loaded.family, "sha256": loaded.model_hash},
        "judge": judge.description,
        "host": {**policy.describe(loaded.stored_dtype),
                 "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                 "torch": torch.__version__, "platform": platform.platform(),
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "settings": settings.to_dict(),
        "locate": layers_info,
        "methods": rows,
        "ratios": ratios(rows),
        "scaling": scaling_rows,
        "stage_seconds": stages,
        # CPU time of this process (all threads) per stage: with N threads and the machine to
        # itself, wall time is about CPU time / N.
        "stage_cpu_seconds": cpu,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def bench_toy(model: str | Path | None, settings: BenchSettings, *, quick: bool, out: str | Path | None = None,
              judge_path: str | Path | None = None, device=None, progress: bool = True, scaling: bool = True,
              only_scaling: bool = False) -> dict:
    """``editc bench``: run on a toy-world model (default: the embedded one), write the JSON and
    Markdown into ``out`` (default: bench/results in a checkout) and print the tables."""
    model = Path(model) if model else TOY_PIPELINE
    if not model.is_dir():
        raise UserError(f"{model}: no toy-world model here; train it (make train-toy) or pass --model PATH "
                        f"(a toy-world diffusers folder with its judge beside it)")
    report = run_bench(model, settings, judge_path=judge_path, device=device, progress=progress,
                       scaling=scaling, methods=not only_scaling)
    stem = "bench_toy_quick" if quick else "bench_toy"
    if only_scaling:
        stem = f"scaling_toy_{settings.scaling_weighting}_{settings.scaling_methods}"
    json_path, md_path = write_report(report, Path(out) if out else RESULTS_DIR, stem)
    print(markdown(report))
    print(f"[bench] wrote {json_path} and {md_path} in {report['stage_seconds']['total']:.0f} s", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m compiler.bench.harness [options]``: ``editc bench [options]`` (its exit codes too)."""
    from compiler.cli import main as editc

    args = sys.argv[1:] if argv is None else list(argv)
    return editc.main(["bench", *args], prog_name="editc", standalone_mode=False) or 0


if __name__ == "__main__":
    sys.exit(main())
