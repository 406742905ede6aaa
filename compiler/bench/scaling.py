"""The benchmark's scaling run: one recipe of 1, 10, 50 and 100 edits (the real ones plus
made-up concepts) compiled together, timed, and verified on the real concepts."""

from __future__ import annotations

import statistics

from compiler.bench.edits import editc_edit, edited_weights, layer_spec
from compiler.bench.quality import edit_success, verify_recipe
from compiler.bench.settings import TASKS, BenchSettings


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
        results = [editc_edit(loaded, edits, f"bench-scaling-{count}", concept_weighting=settings.scaling_weighting)
                   for _ in range(settings.scaling_repeats)]
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
