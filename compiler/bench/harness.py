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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

# In a source checkout the results go to bench/results (committed); from an installed package,
# to bench-results in the working folder.
REPO_ROOT = Path(__file__).resolve().parents[2]
_IN_CHECKOUT = (REPO_ROOT / "bench" / "results").is_dir()


import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from compiler.bench.baselines import BaselineResult, EditTask, synchronize  # noqa: E402
from compiler.bench.baselines.concept_ablation import ConceptAblationConfig, train_concept_ablation  # noqa: E402
from compiler.bench.baselines.esd import ESDConfig, train_esd  # noqa: E402
from compiler.bench.baselines.time_edit import TIMEConfig, time_edit  # noqa: E402
from compiler.bench.baselines.uce import UCEConfig, uce_edit  # noqa: E402
from compiler.errors import UserError  # noqa: E402
from compiler.fuse import fuse_weights, get_parameter  # noqa: E402
from compiler.methods import REGISTRY as METHOD_REGISTRY  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results" if _IN_CHECKOUT else Path("bench-results")
TOY_PIPELINE = Path(__file__).resolve().parents[1] / "toy" / "weights" / "pipeline"

TASKS = {
    "style": EditTask("van gogh", "a painting", "style"),
    "object": EditTask("snoopy", "a dog", "object"),
    "fact": EditTask("the british monarch", "king charles", "fact"),
}
# editc's own methods come from the method plug-ins' registry: each plug-in's bench variants
# (Diff-QuickFix at the paper's site, out_proj, and at layer 0's v_proj, which `method: auto`
# picks for facts) -> (method, its recipe keys, label).
EDITC_VARIANTS = {label: (method.name, fields, title) for method in METHOD_REGISTRY.values()
                  for label, (fields, title) in method.bench_variants().items()}
FINE_TUNING = ("esd-x", "concept-ablation")
CLOSED_FORM = ("uce", "time", *EDITC_VARIANTS)
METHODS = FINE_TUNING + CLOSED_FORM
LABELS = {
    "esd-x": "ESD-x (fine-tuning)", "concept-ablation": "Concept Ablation (fine-tuning)",
    "uce": "UCE (closed form)", "time": "TIME (closed form)",
    **{label: title for label, (_, _, title) in EDITC_VARIANTS.items()},
}
SHORT_LABELS = {"esd-x": "ESD-x", "concept-ablation": "Concept Ablation"}
EDITC_METHODS = set(EDITC_VARIANTS)
NEEDS_LAYERS = {label for label, (method, _, _) in EDITC_VARIANTS.items()
                if METHOD_REGISTRY[method].edits_unet_layers}
# The steps the papers train for, to extrapolate the measured time per step.
REFERENCE_STEPS = {"esd-x": 1000, "concept-ablation": 400}
# The toy world's style window measured on the design prototype (layers 2–4): the layers of
# ``--layers fixed`` runs (``--quick``) unless others are given.
FALLBACK_LAYERS = (2, 3, 4)


# ----------------------------------------------------------------------------- settings
@dataclass
class BenchSettings:
    """Everything that changes the numbers; written into the JSON."""

    methods: tuple[str, ...] = METHODS
    kinds: tuple[str, ...] = tuple(TASKS)
    repeats: int = 5  # closed-form methods: timed this often, median reported
    # Fine-tuning, scaled to a 9 M-parameter UNet (papers: ESD 1000 steps at lr 1e-5, 50 DDIM
    # steps; CA 400 steps at batch 8, lr 1e-5, 200 anchor images of 50 steps). The learning rates
    # were picked on the trained toy model (van gogh, 8 prompts): ESD 1e-4 / 5e-4 / 1e-3 removed
    # the style in 25 / 38 / 25 % of images (1e-3 also broke generic objects); CA 1e-4 / 5e-4 in
    # 0 / 88 %.
    esd: ESDConfig = field(default_factory=lambda: ESDConfig(steps=150, learning_rate=5e-4, ddim_steps=10))
    concept_ablation: ConceptAblationConfig = field(default_factory=lambda: ConceptAblationConfig(
        steps=100, batch_size=8, learning_rate=5e-4, anchor_images=32, anchor_sampling_steps=25,
        anchor_guidance=4.0))
    uce: UCEConfig = field(default_factory=UCEConfig)
    time_edit: TIMEConfig = field(default_factory=TIMEConfig)
    # editc: the ICML paper ablates 30-100 of SD-1.5's 1280 K/V neurons (2-8 %); the toy's
    # K/V layers are 64-128 wide, so 5 is the same share.
    neurons_top_k: int = 5
    # Which cross-attention layers LocoEdit and neurons edit: "locate" (LocoGen per edit, cached
    # on disk), "default" (the papers' table for the model family: real checkpoints) or "fixed"
    # (``fixed_layers`` for every edit).
    layers: str = "locate"
    fixed_layers: tuple[int, ...] = FALLBACK_LAYERS
    # verify (quality)
    verify_seeds: int = 2
    verify_prompts: int = 8  # per group: efficacy, generalization, specificity, generic
    verify_steps: int = 25
    verify_batch: int = 64
    # scaling
    scaling_counts: tuple[int, ...] = (1, 10, 50, 100)
    scaling_repeats: int = 3
    scaling_weighting: str = "concept"  # "concept" (compile's) or "row" (every row equal, as before)
    scaling_methods: str = "auto"  # "auto" (facts by Diff-QuickFix, as method: auto) or "locoedit"
    seed: int = 0

    @classmethod
    def quick(cls) -> BenchSettings:
        """A smoke run: every code path, a couple of minutes, numbers without meaning."""
        return cls(
            repeats=2,
            esd=ESDConfig(steps=2, learning_rate=1e-4, ddim_steps=4),
            concept_ablation=ConceptAblationConfig(steps=2, batch_size=4, learning_rate=1e-4, anchor_images=4,
                                                   anchor_sampling_steps=4, anchor_guidance=4.0),
            layers="fixed", verify_seeds=1, verify_prompts=2, verify_steps=4,
            scaling_counts=(1, 10), scaling_repeats=1,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["methods"] = list(self.methods)
        data["kinds"] = list(self.kinds)
        data["scaling_counts"] = list(self.scaling_counts)
        data["fixed_layers"] = list(self.fixed_layers)
        return data


# ----------------------------------------------------------------------------- weights
@contextmanager
def edited_weights(pipe, new_tensors: dict[str, torch.Tensor]):
    """Write ``new_tensors`` into the pipeline for the block, then put the old ones back."""
    saved = {name: get_parameter(pipe, name).detach().clone() for name in new_tensors}
    fuse_weights(pipe, new_tensors)
    try:
        yield
    finally:
        fuse_weights(pipe, saved)


# ----------------------------------------------------------------------------- editc
def editc_recipe_text(model_path: str, edits: list[dict]) -> str:
    """A recipe (YAML) for in-memory compiles: ``edits`` hold concept, replacement, attribute,
    method and optionally layers (a tuple, "auto" or "default") and neurons_top_k."""
    lines = [f"model: {json.dumps(str(model_path))}", "edits:"]
    for edit in edits:
        lines.append(f"  - concept: {json.dumps(edit['concept'])}")
        lines.append(f"    replacement: {json.dumps(edit['replacement'])}")
        lines.append(f"    attribute: {edit['attribute']}")
        if edit.get("method"):
            lines.append(f"    method: {edit['method']}")
        layers = edit.get("layers")
        if layers is not None:
            lines.append(f"    layers: {layers if isinstance(layers, str) else list(layers)}")
        if edit.get("site"):
            lines.append(f"    site: {edit['site']}")
        if edit.get("neurons_top_k"):
            lines.append(f"    neurons_top_k: {edit['neurons_top_k']}")
    return "\n".join(lines) + "\n"


def layer_spec(layers) -> dict:
    """Recipe fields for an edit's layers: a tuple or "default" as given; a LocoGen result as
    ``layers: auto`` plus the result itself, which compile's own rule turns into layers (the
    located window when it passed, else every cross-attention layer)."""
    if hasattr(layers, "passed"):
        return {"layers": "auto", "located": layers}
    return {"layers": layers}


def editc_edit(loaded, edits: list[dict], label: str) -> BaselineResult:
    """Compile a recipe in memory, as ``editc compile`` does before export: resolve, locate (from
    the LocoGen results handed in with the edits), embed, solve."""
    from compiler.compile import compile_edits, plan_edits
    from compiler.recipe import loads_recipe

    located = {edit["attribute"]: edit["located"] for edit in edits if "located" in edit}
    started = time.perf_counter()
    recipe = loads_recipe(editc_recipe_text(str(loaded.source_path), edits), f"{label}.yaml")
    plans = plan_edits(recipe, loaded, locate_fn=(lambda edit: located[edit.attribute]) if located else None)
    result = compile_edits(recipe, loaded, plans)
    synchronize(loaded.pipeline.unet.device)
    seconds = time.perf_counter() - started
    info = {"timings": result.timings, "solves": result.solve_info, "tensors": len(result.new_tensors),
            "layers": sorted({j for p in plans for j in p.layers}),
            "layers_source": sorted({p.layers_source.value for p in plans})}
    return BaselineResult(edits[0]["method"] if len(edits) == 1 else "locoedit", result.new_tensors, seconds, info)


def editc_edit_spec(task: EditTask, method: str, layers, settings: BenchSettings) -> dict:
    name, fields, _ = EDITC_VARIANTS[method]
    spec = {"concept": task.concept, "replacement": task.replacement, "attribute": task.attribute,
            "method": name, **fields}
    if method in NEEDS_LAYERS:
        spec.update(layer_spec(layers))
    if method == "neurons":
        spec["neurons_top_k"] = settings.neurons_top_k
    return spec


# ----------------------------------------------------------------------------- methods
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


# ----------------------------------------------------------------------------- localization
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


# ----------------------------------------------------------------------------- quality
def verify_recipe(model_path: str, tasks: list[EditTask], settings: BenchSettings):
    from compiler.recipe import loads_recipe

    text = editc_recipe_text(model_path, [{"concept": t.concept, "replacement": t.replacement,
                                           "attribute": t.attribute} for t in tasks])
    text += f"verify:\n  seeds: {settings.verify_seeds}\n  steps: {settings.verify_steps}\n"
    return loads_recipe(text, "bench-verify.yaml")


def edit_success(group, attribute: str) -> tuple[float, float]:
    """(base, edited) share of images in which the edit took: the concept gone (style, object)
    or the new fact shown (fact)."""
    if attribute == "fact":
        return group.base.replacement_accuracy, group.edited.replacement_accuracy
    return 1.0 - group.base.accuracy, 1.0 - group.edited.accuracy


def quality_summary(recipe, groups, attribute: str) -> dict:
    from compiler.verify import evaluate_gates

    by_name = {g.name: g for g in groups}
    out = {}
    for name in ("efficacy", "generalization"):
        if name in by_name:
            base, edited = edit_success(by_name[name], attribute)
            out[name] = {"base": base, "edited": edited}
    for name, key in (("specificity", "neighbours"), ("generic", "generic")):
        if name in by_name:
            g = by_name[name]
            out[key] = {"base": g.base.accuracy, "edited": g.edited.accuracy, "drop": g.accuracy_drop,
                        "feature_distance": g.feature_distance,
                        "subjects": {s.subject: [s.base_accuracy, s.edited_accuracy] for s in g.subjects}}
    gates = evaluate_gates(recipe, groups)
    out["gates"] = {gate.name: ("skipped" if gate.skipped else "passed" if gate.passed else "failed")
                    for gate in gates}
    out["gates_passed"] = sum(1 for g in gates if g.passed and not g.skipped)
    out["gates_total"] = sum(1 for g in gates if not g.skipped)
    return out


def measure_quality(loaded, judge, runs: dict, settings: BenchSettings, say, progress: bool) -> dict:
    """Verify every method's edit of every kind against the base model (base images once per kind)."""
    from compiler.verify.metrics import generate_plan_images, score_plan
    from compiler.verify.probes import plan_probes
    from compiler.verify.run import default_guidance

    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    guidance = default_guidance(judge)
    out = {}
    for kind in settings.kinds:
        task = TASKS[kind]
        recipe = verify_recipe(str(loaded.source_path), [task], settings)
        from compiler.resolve import vocabulary_of
        from compiler.verify.run import find_neighbours_on

        vocabulary = vocabulary_of(loaded)
        plan = plan_probes(recipe, seeds=settings.verify_seeds, vocabulary=vocabulary,
                           found=find_neighbours_on(pipe, recipe, vocabulary), prompts_per_group=settings.verify_prompts)
        methods = [m for m in settings.methods if (kind, m) in runs]
        bar = tqdm(total=len(plan.image_keys()) * (1 + len(methods)), desc=f"verify {kind}", unit="img",
                   disable=not progress, leave=False)
        started = time.perf_counter()
        base_images = generate_plan_images(pipe, plan, steps=settings.verify_steps, guidance=guidance,
                                           batch=settings.verify_batch, progress=bar)
        for method in methods:
            with edited_weights(pipe, runs[(kind, method)][-1].new_tensors):
                images = generate_plan_images(pipe, plan, steps=settings.verify_steps, guidance=guidance,
                                              batch=settings.verify_batch, progress=bar)
            groups = score_plan(plan, base_images, images, judge)
            out[(kind, method)] = quality_summary(recipe, groups, task.attribute)
        bar.close()
        say(f"{kind}: verified {len(methods)} methods on {len(plan.image_keys())} images each "
            f"({time.perf_counter() - started:.0f} s)")
    return out


# ----------------------------------------------------------------------------- scaling
SYLLABLES = ("zor", "vak", "mel", "quin", "dra", "lix", "tor", "bel", "nox", "rav", "sul", "fen", "kri", "pom")
SYNTHETIC_OBJECTS = ("a dog", "a fish", "a robot")
# Never "queen elizabeth": a made-up title mapped onto the monarch's *old* person would fight
# the real fact edit it is solved with, which measures the bench's recipe, not the solver.
SYNTHETIC_PEOPLE = ("rishi sunak", "boris johnson", "king charles")


def made_up_names(count: int) -> list[str]:
    """Deterministic invented words ('zorvak', 'zormel', ...): concepts no model has learned."""
    names = [a + b for a in SYLLABLES for b in SYLLABLES if a != b]
    if count > len(names):
        raise ValueError(f"at most {len(names)} made-up names")
    return names[:count]


# The method of each kind of edit in the scaling recipe: ``auto`` is what ``method: auto`` picks
# on the toy world (LocoEdit for styles and objects, Diff-QuickFix at v_proj for facts, which
# LocoEdit cannot tell from their old answer: README "Why the fact needs v_proj"); ``locoedit``
# makes every edit LocoEdit (one solve for all), as the scaling run did first.
SCALING_METHODS = {
    "auto": {"style": {"method": "locoedit"}, "object": {"method": "locoedit"},
             "fact": {"method": "quickfix", "site": "v_proj"}},
    "locoedit": {kind: {"method": "locoedit"} for kind in ("style", "object", "fact")},
}


def scaling_edits(count: int, layers: dict, methods: str = "auto") -> list[dict]:
    """``count`` edits: the real ones first (style, object, fact), then made-up artists
    (style → a painting), characters (object → a generic object) and titles (fact → a person),
    in turn, each kind with its method of ``SCALING_METHODS[methods]``; made-up LocoEdit edits
    use the layers of the real edit of their kind."""
    chosen = SCALING_METHODS[methods]

    def spec(kind: str) -> dict:
        fields = dict(chosen[kind])
        if fields["method"] == "locoedit":
            fields.update(layer_spec(layers[kind]))
        return fields

    real = [TASKS[k] for k in ("style", "object", "fact")][:count]
    edits = [{"concept": t.concept, "replacement": t.replacement, "attribute": t.attribute, **spec(k)}
             for t, k in zip(real, ("style", "object", "fact"))]
    for i, name in enumerate(made_up_names(max(0, count - len(real)))):
        kind = ("style", "object", "fact")[i % 3]
        if kind == "style":
            concept, replacement = name, "a painting"
        elif kind == "object":
            concept, replacement = name, SYNTHETIC_OBJECTS[i % len(SYNTHETIC_OBJECTS)]
        else:
            concept, replacement = f"the mayor of {name}", SYNTHETIC_PEOPLE[i % len(SYNTHETIC_PEOPLE)]
        edits.append({"concept": concept, "replacement": replacement, "attribute": kind, **spec(kind)})
    return edits


def run_scaling(loaded, judge, settings: BenchSettings, layers: dict, say, progress: bool) -> list[dict]:
    from compiler.verify.metrics import generate_plan_images, score_plan
    from compiler.verify.probes import EFFICACY, plan_probes
    from compiler.verify.run import default_guidance

    pipe = loaded.pipeline
    guidance = default_guidance(judge)

    from compiler import resolve
    from compiler.verify.probes import GENERALIZATION, GENERIC, SPECIFICITY
    from compiler.verify.run import find_neighbours_on

    vocabulary = resolve.vocabulary_of(loaded)

    def verify_plan(tasks):
        """Every verify group of the real concepts (neighbours found on the base model)."""
        recipe = verify_recipe(str(loaded.source_path), tasks, settings)
        found = find_neighbours_on(pipe, recipe, vocabulary)
        return plan_probes(recipe, seeds=settings.verify_seeds, vocabulary=vocabulary, found=found,
                           prompts_per_group=settings.verify_prompts)

    real_tasks = [TASKS[k] for k in ("style", "object", "fact")]
    base_images = {}
    rows = []
    for count in settings.scaling_counts:
        edits = scaling_edits(count, layers, settings.scaling_methods)
        with concept_weighting(settings.scaling_weighting):
            results = [editc_edit(loaded, edits, f"bench-scaling-{count}") for _ in range(settings.scaling_repeats)]
        result = results[-1]
        tasks = real_tasks[: min(count, 3)]
        plan = verify_plan(tasks)
        if len(tasks) not in base_images:
            base_images[len(tasks)] = generate_plan_images(pipe, plan, steps=settings.verify_steps,
                                                           guidance=guidance, batch=settings.verify_batch)
        with edited_weights(pipe, result.new_tensors):
            images = generate_plan_images(pipe, plan, steps=settings.verify_steps, guidance=guidance,
                                          batch=settings.verify_batch)
        groups = score_plan(plan, base_images[len(tasks)], images, judge)
        by_key = {(g.name, g.edit_index): g for g in groups}
        efficacy, concepts = {}, {}
        for index, task in enumerate(tasks):
            base, edited = edit_success(by_key[(EFFICACY, index)], task.attribute)
            efficacy[task.concept] = {"base": base, "edited": edited}
            g_base, g_edited = edit_success(by_key[(GENERALIZATION, index)], task.attribute)
            neighbours = by_key.get((SPECIFICITY, index))
            concepts[task.concept] = {
                "efficacy": edited, "generalization": g_edited, "generalization_base": g_base,
                "neighbours": [n for n, _ in (plan.neighbours or {}).get(index, ())],
                "neighbour_accuracy": {"base": neighbours.base.accuracy, "edited": neighbours.edited.accuracy}
                if neighbours else None,
            }
        generic = by_key.get((GENERIC, None))
        solves = result.info["solves"]
        row = {
            "concepts": count, "real_concepts": len(tasks), "methods": settings.scaling_methods,
            "rows": sum(s["rows"] for s in solves), "preserve_rows": sum(s["preserve_rows"] for s in solves),
            "layers": sorted({j for s in solves for j in s.get("layers", ())}),
            "solves": [{k: s.get(k) for k in ("method", "site", "rows", "preserve_rows")} for s in solves],
            "compile_seconds": [r.seconds for r in results],
            "compile_seconds_median": statistics.median(r.seconds for r in results),
            "embed_seconds_median": statistics.median(r.info["timings"].get("embed", 0.0) for r in results),
            "solve_seconds_median": statistics.median(r.info["timings"].get("solve", 0.0) for r in results),
            "efficacy": efficacy,
            "efficacy_mean": statistics.fmean(v["edited"] for v in efficacy.values()),
            "concepts_verified": concepts,
            "generic_accuracy": {"base": generic.base.accuracy, "edited": generic.edited.accuracy} if generic else None,
            "weighting": settings.scaling_weighting,
        }
        rows.append(row)
        say(f"scaling: {count} concepts, {row['rows']} rows: compile {row['compile_seconds_median']:.2f} s "
            f"(solve {row['solve_seconds_median']:.3f} s), efficacy on real concepts {row['efficacy_mean']:.2f}")
    return rows


class concept_weighting:  # noqa: N801 - a context manager used like a function
    """``concept``: compile's per-concept row weights (every concept counts equally); ``row``:
    every row weighs the same (what compile did before), for comparison."""

    def __init__(self, mode: str):
        self.mode = mode

    def __enter__(self):
        from compiler.methods import rows

        self.saved = rows.concept_weights
        if self.mode == "row":
            rows.concept_weights = lambda counts, lams, lam: [lam / x for x in lams]
        return self

    def __exit__(self, *exc):
        from compiler.methods import rows

        rows.concept_weights = self.saved


# ----------------------------------------------------------------------------- report
def method_rows(runs: dict, quality: dict, settings: BenchSettings) -> list[dict]:
    rows = []
    for kind in settings.kinds:
        task = TASKS[kind]
        for method in settings.methods:
            if (kind, method) not in runs:
                continue
            results = runs[(kind, method)]
            seconds = [r.seconds for r in results]
            info = dict(results[-1].info)
            rows.append({
                "kind": kind, "concept": task.concept, "replacement": task.replacement, "method": method,
                "label": LABELS[method], "family": "fine-tuning" if method in FINE_TUNING else "closed form",
                "seconds": seconds, "median_seconds": statistics.median(seconds),
                "median_cpu_seconds": statistics.median(r.info["cpu_seconds"] for r in results),
                "edited_tensors": len(results[-1].new_tensors), "info": _jsonable(info),
                "quality": quality.get((kind, method)),
            })
    return rows


def ratios(rows: list[dict]) -> dict:
    """Fine-tuning time over closed-form time, per kind, for every closed-form method; also with
    the fine-tuning extrapolated to the papers' step counts (its measured time per step)."""
    out = {}
    by = {(r["kind"], r["method"]): r for r in rows}
    for (kind, method), row in by.items():
        if method not in CLOSED_FORM:
            continue
        for tuner in FINE_TUNING:
            ft = by.get((kind, tuner))
            if ft is None:
                continue
            per_step = ft["info"]["seconds_per_step"]
            fixed = ft["median_seconds"] - per_step * ft["info"]["steps"]  # e.g. anchor images
            at_reference = fixed + per_step * REFERENCE_STEPS[tuner]
            out.setdefault(kind, {}).setdefault(method, {})[tuner] = {
                "measured": ft["median_seconds"] / row["median_seconds"],
                "measured_cpu": ft["median_cpu_seconds"] / row["median_cpu_seconds"],
                "at_paper_steps": at_reference / row["median_seconds"],
                "fine_tuning_seconds": ft["median_seconds"], "fine_tuning_steps": ft["info"]["steps"],
                "fine_tuning_seconds_at_paper_steps": at_reference, "paper_steps": REFERENCE_STEPS[tuner],
                "closed_form_seconds": row["median_seconds"],
            }
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _fmt(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _delta(scores: dict) -> str:
    return f"{scores['edited'] - scores['base'] + 0.0:+.2f}"  # + 0.0: no "-0.00"


def _seconds(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.3f}"


def markdown(report: dict) -> str:
    """The README tables: methods × edits, the speed ratios, and scaling."""
    rows = report["methods"]
    ratio = report["ratios"]
    lines = []
    host = report["host"]
    where = f"GPU {host['gpu']}" if host.get("gpu") else f"{host['torch_threads']} CPU thread(s)"
    if report.get("load_average_at_end"):
        where += f" (machine load average {report['load_average_at_end'][1]:.1f} over the last 5 min of the run)"
    lines.append(f"Model {report['model']['family']} ({Path(report['model']['path']).name}), {where}, "
                 f"{report['settings']['repeats']} interleaved "
                 f"repeats of each closed-form edit (median); quality by `compiler.verify` "
                 f"({report['settings']['verify_seeds']} seeds × {report['settings']['verify_prompts']} prompts per "
                 f"group, {report['settings']['verify_steps']} DDIM steps).")
    lines.append("")
    lines.append("| Edit | Method | Time (s) | ESD-x ÷ this | CA ÷ this | Efficacy | Generalization | "
                 "Neighbours acc. (Δ) | Generic acc. (Δ) | Gates |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in report["settings"]["kinds"]:
        kind_rows = [r for r in rows if r["kind"] == kind]
        if not kind_rows:
            continue
        first = kind_rows[0]
        edit = f"{kind}: {first['concept']} → {first['replacement']}"
        q0 = next((r["quality"] for r in kind_rows if r["quality"]), None)
        if q0:
            lines.append(f"| {edit} | *base model* | | | | {_fmt(q0['efficacy']['base'])} | "
                         f"{_fmt(q0['generalization']['base'])} | {_fmt(q0['neighbours']['base'])} | "
                         f"{_fmt(q0['generic']['base'])} | |")
        for r in kind_rows:
            q = r["quality"] or {}
            rr = ratio.get(kind, {}).get(r["method"], {})
            esd = rr.get("esd-x", {}).get("measured")
            ca = rr.get("concept-ablation", {}).get("measured")
            cells = [
                edit if not q0 else "", r["label"], _seconds(r["median_seconds"]),
                f"{esd:,.0f}×" if esd else "", f"{ca:,.0f}×" if ca else "",
                _fmt(q.get("efficacy", {}).get("edited")), _fmt(q.get("generalization", {}).get("edited")),
                f"{_fmt(q['neighbours']['edited'])} ({_delta(q['neighbours'])})" if "neighbours" in q else "–",
                f"{_fmt(q['generic']['edited'])} ({_delta(q['generic'])})" if "generic" in q else "–",
                f"{q['gates_passed']}/{q['gates_total']}" if q else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Efficacy / generalization: share of images (solve templates / held-out paraphrases) in which "
                 "the edit took — the judge no longer sees the concept (style, object) or sees the new fact "
                 "(fact). Neighbours / generic: the judge's accuracy on neighbouring concepts / generic object "
                 "prompts after the edit, Δ vs the base model. Gates: verify's default gates passed.")
    summary = ratio_summary(report)
    if summary:
        lines.append("")
        lines.extend(summary)
    if report.get("scaling"):
        lines.append("")
        lines.append("| Concepts in one recipe | Edit rows | Compile (s) | of which solve (s) | "
                     "Efficacy / generalization on the real concepts | Their neighbours (base → edited) | "
                     "Generic (base → edited) |")
        lines.append("|---:|---:|---:|---:|---|---|---|")
        for row in report["scaling"]:
            verified = row.get("concepts_verified") or {}
            if verified:
                eff = ", ".join(f"{c} {v['efficacy']:.2f} / {v['generalization']:.2f}" for c, v in verified.items())
                near = ", ".join(f"{c} {v['neighbour_accuracy']['base']:.2f} → {v['neighbour_accuracy']['edited']:.2f}"
                                 for c, v in verified.items() if v["neighbour_accuracy"])
            else:
                eff, near = ", ".join(f"{c} {v['edited']:.2f}" for c, v in row["efficacy"].items()), ""
            generic = row.get("generic_accuracy")
            generic = f"{generic['base']:.2f} → {generic['edited']:.2f}" if generic else ""
            lines.append(f"| {row['concepts']} | {row['rows']:,} | {_seconds(row['compile_seconds_median'])} | "
                         f"{_seconds(row['solve_seconds_median'])} | {eff} | {near} | {generic} |")
    return "\n".join(lines) + "\n"


def ratio_summary(report: dict) -> list[str]:
    rows = report["methods"]
    by = {(r["kind"], r["method"]): r for r in rows}
    lines = []
    for tuner in FINE_TUNING:
        for method in ("locoedit", "quickfix", "quickfix-v"):
            measured, paper, cpu = [], [], []
            for kind in report["settings"]["kinds"]:
                rr = report["ratios"].get(kind, {}).get(method, {}).get(tuner)
                if rr:
                    measured.append((kind, rr["measured"]))
                    paper.append(rr["at_paper_steps"])
                    cpu.append(rr.get("measured_cpu"))
            if not measured:
                continue
            ft = [by[(k, tuner)] for k, _ in measured]
            steps = ft[0]["info"]["steps"]
            per_step = statistics.fmean(r["info"]["seconds_per_step"] for r in ft)
            lines.append(
                f"- {LABELS[method]} vs {SHORT_LABELS[tuner]} ({steps} steps here, {per_step:.3f} s/step): "
                + ", ".join(f"{k} {m:,.0f}×" for k, m in measured)
                + " faster in wall time (" + ", ".join(f"{c:,.0f}×" for c in cpu if c) + " in CPU time); at the "
                + f"papers' {REFERENCE_STEPS[tuner]} steps: " + ", ".join(f"{p:,.0f}×" for p in paper) + ".")
    return lines


def write_report(report: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    for path, text in ((json_path, json.dumps(_jsonable(report), indent=1) + "\n"), (md_path, markdown(report))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return json_path, md_path


# ----------------------------------------------------------------------------- main
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="editc bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="diffusers folder of a toy-world model (default: the embedded toy model)")
    parser.add_argument("--judge", default=None,
                        help="judge folder (default: the toy world's judge beside the model)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help=f"where the JSON and Markdown go (default: {RESULTS_DIR})")
    parser.add_argument("--quick", action="store_true", help="smoke run: every code path, tiny settings, no meaning")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--kinds", default=",".join(TASKS), help="comma-separated subset of style,object,fact")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of each closed-form edit")
    parser.add_argument("--esd-steps", type=int, default=None, help="ESD fine-tuning steps")
    parser.add_argument("--ca-steps", type=int, default=None, help="Concept Ablation fine-tuning steps")
    parser.add_argument("--layers", default=None,
                        help="LocoEdit/neurons layers: locate (LocoGen, cached; the default), default (the papers' "
                             "table for real checkpoints) or a list like 2,3,4 for every edit")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1/10/50/100-concept scaling run")
    parser.add_argument("--only-scaling", action="store_true",
                        help="only the scaling run (no method timing or quality); writes scaling_toy.*")
    parser.add_argument("--scaling-counts", default=None, help="comma-separated recipe sizes (default 1,10,50,100)")
    parser.add_argument("--scaling-repeats", type=int, default=None, help="timed compiles per size")
    parser.add_argument("--scaling-weighting", choices=("concept", "row"), default=None,
                        help="concept: per-concept row weights (compile's); row: every row equal (before)")
    parser.add_argument("--scaling-methods", choices=tuple(SCALING_METHODS), default=None,
                        help="auto: facts by Diff-QuickFix at v_proj, as method: auto picks (default); "
                             "locoedit: every edit LocoEdit")
    parser.add_argument("--device", default=None, help="torch device (default: $EDITC_DEVICE, else cuda when "
                                                       "available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def parse_layers(text: str) -> dict:
    """``--layers``: "locate", "default" or "2,3,4" -> BenchSettings fields."""
    text = text.strip().lower()
    if text in ("locate", "default"):
        return {"layers": text}
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        raise UserError(f"--layers: {text!r} is not locate, default or a list of layer indices like 2,3,4")
    return {"layers": "fixed", "fixed_layers": layers}


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    settings = BenchSettings.quick() if args.quick else BenchSettings()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [m for m in methods if m not in METHODS] + [k for k in kinds if k not in TASKS]
    if bad or not methods or not kinds:
        raise UserError(f"--methods/--kinds: unknown {', '.join(bad) or 'empty list'}; methods are "
                        f"{', '.join(METHODS)}; kinds are {', '.join(TASKS)}")
    settings = replace(settings, methods=methods, kinds=kinds)
    if args.repeats is not None:
        if args.repeats < 1:
            raise UserError("--repeats must be at least 1")
        settings = replace(settings, repeats=args.repeats)
    if args.esd_steps is not None:
        settings = replace(settings, esd=replace(settings.esd, steps=args.esd_steps))
    if args.ca_steps is not None:
        settings = replace(settings, concept_ablation=replace(settings.concept_ablation, steps=args.ca_steps))
    if args.layers is not None:
        settings = replace(settings, **parse_layers(args.layers))
    if args.scaling_counts:
        settings = replace(settings, scaling_counts=tuple(int(x) for x in args.scaling_counts.split(",")))
    if args.scaling_repeats is not None:
        settings = replace(settings, scaling_repeats=args.scaling_repeats)
    if args.scaling_weighting:
        settings = replace(settings, scaling_weighting=args.scaling_weighting)
    if args.scaling_methods:
        settings = replace(settings, scaling_methods=args.scaling_methods)
    return settings


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    model = Path(args.model) if args.model else TOY_PIPELINE
    if not model.is_dir():
        raise UserError(f"{model}: no toy-world model here; train it (make train-toy) or pass --model PATH "
                        f"(a toy-world diffusers folder with its judge beside it)")
    report = run_bench(model, settings, judge_path=args.judge, device=args.device, progress=not args.quiet,
                       scaling=not args.no_scaling, methods=not args.only_scaling)
    stem = "bench_toy_quick" if args.quick else "bench_toy"
    if args.only_scaling:
        stem = f"scaling_toy_{settings.scaling_weighting}_{settings.scaling_methods}"
    json_path, md_path = write_report(report, Path(args.out), stem)
    print(markdown(report))
    print(f"[bench] wrote {json_path} and {md_path} in {report['stage_seconds']['total']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"editc bench: error: {err}", file=sys.stderr)
        sys.exit(2)
