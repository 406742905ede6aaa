"""The benchmark's timing: every method's edited weights for every edit, timed as the harness's
docstring says (closed forms interleaved, fine-tuning between rounds), and the layers LocoEdit
and neurons edit (``locate_layers``)."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from compiler.bench.baselines import BaselineResult, EditTask, synchronize
from compiler.bench.baselines.concept_ablation import train_concept_ablation
from compiler.bench.baselines.esd import train_esd
from compiler.bench.baselines.time_edit import time_edit
from compiler.bench.baselines.uce import uce_edit
from compiler.bench.edits import editc_edit, editc_edit_spec
from compiler.bench.settings import CLOSED_FORM, EDITC_METHODS, FINE_TUNING, LABELS, TASKS, BenchSettings
from compiler.fuse import fuse_weights, get_parameter


def run_method(method: str, loaded, kind: str, task: EditTask, layers, settings: BenchSettings,
               progress: bool) -> BaselineResult:
    """Make one method's edited weights for one task. Closed-form methods are also written into
    the pipeline inside the timed span (and restored after it); fine-tuning methods are timed
    from start to trained weights. ``info["cpu_seconds"]`` is the process CPU time of the same
    span (all threads): unlike wall time, it does not grow when other jobs share the machine."""
    pipe = loaded.pipeline
    cpu_started = time.process_time()
    if method == "esd-x":
        result = train_esd(pipe, task, replace(settings.esd, seed=settings.seed), progress=progress)
        result.info["cpu_seconds"] = time.process_time() - cpu_started
        return result
    if method == "concept-ablation":
        result = train_concept_ablation(pipe, task, replace(settings.concept_ablation, seed=settings.seed),
                                        progress=progress)
        result.info["cpu_seconds"] = time.process_time() - cpu_started
        return result
    started = time.perf_counter()
    if method == "uce":
        result = uce_edit(loaded, task, settings.uce)
    elif method == "time":
        result = time_edit(loaded, task, settings.time_edit)
    elif method in EDITC_METHODS:
        result = editc_edit(loaded, [editc_edit_spec(task, method, layers, settings)], f"bench-{kind}-{method}")
    else:
        raise ValueError(f"unknown method {method!r}")
    saved = {name: get_parameter(pipe, name).detach().clone() for name in result.new_tensors}
    fuse_weights(pipe, result.new_tensors)
    synchronize(pipe.unet.device)
    result.seconds = time.perf_counter() - started
    result.info["cpu_seconds"] = time.process_time() - cpu_started
    fuse_weights(pipe, saved)
    return result


def time_methods(loaded, settings: BenchSettings, layers: dict, say, progress: bool) -> dict:
    """Per (kind, method): every timed run and the last result. Interleaved as described above."""
    runs: dict[tuple[str, str], list[BaselineResult]] = {}
    closed = [m for m in settings.methods if m in CLOSED_FORM]
    if closed:  # one untimed call each first: lazy imports and first-call allocations
        first = settings.kinds[0]
        for method in closed:
            run_method(method, loaded, first, TASKS[first], layers.get(first), settings, progress)
    for kind in settings.kinds:
        task = TASKS[kind]
        waiting = [m for m in settings.methods if m in FINE_TUNING]
        rounds = settings.repeats if closed else 0
        for round_index in range(max(rounds, len(waiting))):
            if round_index < rounds:
                shift = round_index % len(closed)
                for method in closed[shift:] + closed[:shift]:
                    result = run_method(method, loaded, kind, task, layers.get(kind), settings, progress)
                    for earlier in runs.get((kind, method), []):
                        earlier.new_tensors = {}  # only the last repeat's weights are verified
                    runs.setdefault((kind, method), []).append(result)
            if waiting:
                method = waiting.pop(0)
                say(f"{kind}: {LABELS[method]} ({task.concept} -> {task.replacement})")
                result = run_method(method, loaded, kind, task, layers.get(kind), settings, progress)
                runs[(kind, method)] = [result]
                say(f"{kind}: {LABELS[method]} took {result.seconds:.1f} s "
                    f"({result.info['seconds_per_step']:.3f} s/step)")
        if closed:
            medians = ", ".join(f"{m} {statistics.median(r.seconds for r in runs[(kind, m)]):.3f}s" for m in closed)
            say(f"{kind}: closed-form medians: {medians}")
    return runs


def locate_layers(loaded, settings: BenchSettings, kinds, say, progress: bool) -> tuple[dict, dict]:
    """Per kind: what to report, and what the edits get (a LocoGen result, "default" or a tuple).

    LocoGen runs with ``editc compile``'s sweep settings; only a cached sweep with exactly these
    settings is reused (not any earlier sweep of the concept, as compile would), so the bench
    edits the same layers on every run of the same model."""
    from compiler.locate.locogen import COMPILE_SWEEP, locate

    SWEEP_REPORTED = ("n_prompts", "steps", "confirm_steps", "max_m")  # what differs from locate's defaults
    from compiler.locate.scoring import load_judge_for

    out, layers = {}, {}
    judge = None
    for kind in kinds:
        task = TASKS[kind]
        if settings.layers == "default":
            out[kind] = {"layers": "default", "source": "the papers' known location for the model family",
                         "seconds": 0.0, "cached": None}
            layers[kind] = "default"
            continue
        if settings.layers == "fixed":
            out[kind] = {"layers": list(settings.fixed_layers), "source": "fixed (--layers)", "seconds": 0.0,
                         "cached": None}
            layers[kind] = tuple(settings.fixed_layers)
            continue
        say(f"{kind}: locate '{task.concept}' (LocoGen; cached after the first run)")
        judge = judge or load_judge_for(loaded.source_path)
        started = time.perf_counter()
        result = locate(loaded.pipeline, task.concept, task.replacement, task.attribute, COMPILE_SWEEP, judge=judge,
                        model_hash=loaded.model_hash, progress=progress)
        seconds = time.perf_counter() - started
        out[kind] = {"best_window": list(result.layers), "passed": bool(result.passed), "source": "LocoGen",
                     "settings": {name: getattr(COMPILE_SWEEP, name) for name in SWEEP_REPORTED},
                     "seconds": round(seconds, 3), "cached": bool(result.cached),
                     "sweep_timings": result.timings}
        layers[kind] = result
        say(f"{kind}: best window {list(result.layers)}, passed: {result.passed} "
            f"({'cached' if result.cached else f'{seconds:.0f} s'})")
    return out, layers
