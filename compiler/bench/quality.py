"""The benchmark's quality: every method's edit verified against the base model with editc's
verify code (``compiler.verify``): the same probes, seeds and judge for every method."""

from __future__ import annotations

import time

from tqdm import tqdm

from compiler.bench.baselines import EditTask
from compiler.bench.edits import editc_recipe_text, edited_weights
from compiler.bench.settings import TASKS, BenchSettings


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
