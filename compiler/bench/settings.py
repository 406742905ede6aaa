"""The edit benchmark's settings: the three edits, the methods, and everything that changes the
numbers (``BenchSettings``, written into the report), from ``editc bench``'s options too."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compiler.bench.baselines import EditTask
from compiler.bench.baselines.concept_ablation import ConceptAblationConfig
from compiler.bench.baselines.esd import ESDConfig
from compiler.bench.baselines.time_edit import TIMEConfig
from compiler.bench.baselines.uce import UCEConfig
from compiler.errors import UserError
from compiler.methods import REGISTRY as METHOD_REGISTRY

# In a source checkout the results go to bench/results (committed); from an installed package,
# to bench-results in the working folder.
REPO_ROOT = Path(__file__).resolve().parents[2]
_IN_CHECKOUT = (REPO_ROOT / "bench" / "results").is_dir()
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


def settings_from_options(*, quick: bool = False, methods: str | None = None, kinds: str | None = None,
                          repeats: int | None = None, esd_steps: int | None = None, ca_steps: int | None = None,
                          layers: str | None = None, scaling_counts: str | None = None,
                          scaling_repeats: int | None = None, scaling_weighting: str | None = None,
                          scaling_methods: str | None = None) -> BenchSettings:
    """``editc bench``'s options (None: not given) -> the settings they ask for."""
    from compiler.bench.scaling import SCALING_METHODS

    settings = BenchSettings.quick() if quick else BenchSettings()
    methods_given = tuple(m.strip() for m in (methods or ",".join(settings.methods)).split(",") if m.strip())
    kinds_given = tuple(k.strip() for k in (kinds or ",".join(settings.kinds)).split(",") if k.strip())
    bad = [m for m in methods_given if m not in METHODS] + [k for k in kinds_given if k not in TASKS]
    if bad or not methods_given or not kinds_given:
        raise UserError(f"--methods/--kinds: unknown {', '.join(bad) or 'empty list'}; methods are "
                        f"{', '.join(METHODS)}; kinds are {', '.join(TASKS)}")
    settings = replace(settings, methods=methods_given, kinds=kinds_given)
    if repeats is not None:
        if repeats < 1:
            raise UserError("--repeats must be at least 1")
        settings = replace(settings, repeats=repeats)
    if esd_steps is not None:
        settings = replace(settings, esd=replace(settings.esd, steps=esd_steps))
    if ca_steps is not None:
        settings = replace(settings, concept_ablation=replace(settings.concept_ablation, steps=ca_steps))
    if layers is not None:
        settings = replace(settings, **parse_layers(layers))
    if scaling_counts:
        try:
            counts = tuple(int(x) for x in scaling_counts.split(","))
        except ValueError:
            raise UserError(f"--scaling-counts: {scaling_counts!r} is not a list of sizes like 1,10,50") from None
        settings = replace(settings, scaling_counts=counts)
    if scaling_repeats is not None:
        settings = replace(settings, scaling_repeats=scaling_repeats)
    if scaling_weighting:
        settings = replace(settings, scaling_weighting=scaling_weighting)
    if scaling_methods:
        if scaling_methods not in SCALING_METHODS:
            raise UserError(f"--scaling-methods: {scaling_methods!r} is not one of {', '.join(SCALING_METHODS)}")
        settings = replace(settings, scaling_methods=scaling_methods)
    return settings
