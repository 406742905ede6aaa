"""Planted knowledge: a fresh word that means a donor concept *only* in layers we chose.

Localization (LocoGen, causal tracing) can only be tested against ground truth, and the toy
world keeps its own knowledge everywhere. So we put knowledge somewhere on purpose:

- **UNet planting** (style, object): a closed-form edit of the ``to_k``/``to_v`` of the chosen
  cross-attention layers (LocoEdit, ICML 2024 eq. 3, solved by ``compiler.solve``) maps the
  context row of the word's last token onto the donor's, with every other layer untouched.
  One window of three or fewer layers carrying the donor's own K/V does not draw the donor on
  the toy (its knowledge is spread over 16 layers: README "Where the toy world keeps its
  knowledge"), so the target is the donor's row *extrapolated* away from the word's,
  ``x_target = x_word + g (x_donor − x_word)`` (gain g ≥ 1; g = 1 is LocoEdit's own target).
  Preservation rows (UCE) keep the toy's generic captions, and hold the donor's and the
  neutral replacement's own prompts ``held_weight`` times harder, so that the neutral prompt
  in the window does not draw the donor. ``calibrate_gain`` picks g from a ladder by what the
  judge sees.
- **Text-encoder planting** (fact): a Diff-QuickFix-style edit (ICLR 2024 eq. 4) of one
  text-encoder layer's attention ``out_proj``: at the word's last token it emits what makes the
  layer's output state equal the donor's, ``v = Ŵ k_donor + (x_donor − x_word)`` (x: the
  layer's input there, so ``x_word + v = x_donor + Ŵ k_donor``); generic captions' keys keep
  their outputs.

A planted model is an ordinary diffusers folder with, inside it, the toy judge (vision tower,
the *unplanted* text tower, and ``aliases.json`` saying the word shows the donor) and a
``vocabulary.yaml`` that knows the word, so every editc command takes it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compiler import resolve, solve
from compiler.encode import encoder_layers
from compiler.errors import UserError

ATTRIBUTES = ("style", "object", "fact")
GAIN_LADDER = (2.0, 4.0, 8.0, 16.0, 32.0)
HELD_WEIGHT = 8.0  # the donor's and the neutral's own prompts, against the generic captions' 1
ALIASES_FILE = "aliases.json"
TEXT_TOWER_FILE = "text_model.safetensors"


@dataclass(frozen=True)
class PlantSpec:
    word: str
    donor: str
    attribute: str
    layers: tuple[int, ...] = ()  # UNet cross-attention layers (style, object)
    encoder_layer: int | None = None  # text-encoder layer (fact)
    neutral: str | None = None  # what LocoGen's c′ says instead of the word (default: neutral_for)
    gain: float | None = None  # None: calibrated from GAIN_LADDER
    seed: int = 0
    lam: float = solve.DEFAULT_LAMBDA


@dataclass
class Planted:
    """A planted pipeline (in memory) and what went into it."""

    pipeline: object
    spec: PlantSpec
    neutral: str
    gain: float
    edited: dict[str, torch.Tensor]  # qualified name -> new tensor
    calibration: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- checks
def check_spec(spec: PlantSpec, vocabulary, num_layers: int, num_encoder_layers: int) -> None:
    """Refuse, in one line, what cannot be planted."""
    word = spec.word.strip().lower()
    if spec.attribute not in ATTRIBUTES:
        raise UserError(f"--attribute {spec.attribute!r}: must be one of {', '.join(ATTRIBUTES)}")
    if not word or not all(ch.isalpha() or ch == " " for ch in word):
        raise UserError(f"--word {spec.word!r}: must be letters (and spaces)")
    known = [c for a in ATTRIBUTES for c in vocabulary.concepts(a)] + list(vocabulary.styles_in_templates)
    words = {w for phrase in [*known, *vocabulary.captions] for w in phrase.split()}
    if any(w in words for w in word.split()):
        raise UserError(f"--word {spec.word!r}: the toy world already knows it; pick a fresh word")
    if vocabulary.attribute_of(spec.donor) is None:
        raise UserError(f"--donor {spec.donor!r}: not a concept of {vocabulary.name}; "
                        f"it knows {', '.join(vocabulary.concepts(spec.attribute))}")
    if spec.attribute == "fact":
        if spec.encoder_layer is None or not 0 <= spec.encoder_layer < num_encoder_layers:
            raise UserError(f"--encoder-layer: a fact is planted in one text-encoder layer 0..{num_encoder_layers - 1}")
        return
    if not spec.layers:
        raise UserError("--layers: give the UNet cross-attention layers to plant in, e.g. 7,8,9")
    layers = sorted(spec.layers)
    if layers[0] < 0 or layers[-1] >= num_layers or len(set(layers)) != len(layers):
        raise UserError(f"--layers {','.join(map(str, spec.layers))}: must be distinct layers 0..{num_layers - 1}")
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise UserError(f"--layers {','.join(map(str, spec.layers))}: must be adjacent (a LocoGen window)")


def neutral_for(donor: str, attribute: str, vocabulary) -> str:
    """LocoGen's c′ for a planted word: the neutral style, a character's generic thing, the
    fact's outdated answer, else an object the donor is not."""
    if attribute == "style":
        return "a painting"
    generic = vocabulary.generic_of_characters.get(donor)
    if generic:
        return generic
    if attribute == "fact":
        people = [p for p in vocabulary.concepts("fact") if p != donor and p not in vocabulary.people_of_facts]
        return people[0]
    return next(o for o in vocabulary.objects if o not in (donor, f"a {donor}"))


# ----------------------------------------------------------------------------- planting
def plant(pipe, spec: PlantSpec, vocabulary, *, judge=None, progress: bool = False) -> Planted:
    """Plant ``spec`` into ``pipe`` in place (a fact in the text encoder, else the UNet)."""
    from compiler.encode import PipelineModel
    from compiler.fuse import fuse_weights

    registry = PipelineModel(pipe).registry
    check_spec(spec, vocabulary, len(registry.cross_attention), _num_encoder_layers(pipe))
    neutral = spec.neutral or neutral_for(spec.donor, spec.attribute, vocabulary)
    if spec.attribute == "fact":
        edited = text_encoder_edit(pipe, spec, vocabulary)
        fuse_weights(pipe, edited)
        return Planted(pipe, spec, neutral, 1.0, edited)
    solver = UnetPlanting(pipe, spec, neutral, vocabulary)
    if spec.gain is not None:
        gain, calibration = spec.gain, []
    else:
        if judge is None:
            raise ValueError("calibrating the gain needs a judge")
        gain, calibration = calibrate_gain(solver, judge, progress=progress)
    edited = solver.solve(gain)
    fuse_weights(pipe, edited)
    return Planted(pipe, spec, neutral, gain, edited, calibration)


class UnetPlanting:
    """The rows of one UNet planting, embedded once; ``solve(g)`` for any gain."""

    def __init__(self, pipe, spec: PlantSpec, neutral: str, vocabulary):
        from compiler.encode import PipelineModel, PromptEncoder

        self.pipe, self.spec, self.neutral = pipe, spec, neutral
        encoder = PromptEncoder(pipe)
        tokenizer = encoder.tokenizer()
        self.pairs = resolve.prompt_pairs(spec.word, spec.donor, spec.attribute, vocabulary=vocabulary)
        # The word's last token -> the donor's last token (LocoEdit's positions, no EOS rows).
        s_pos, t_pos = resolve.pair_positions(tokenizer, self.pairs, spec.word, spec.donor, eos=False)
        self.x_word = encoder.context_rows([p.source for p in self.pairs], s_pos)
        self.x_donor = encoder.context_rows([p.target for p in self.pairs], t_pos)
        generic = resolve.default_preserve_prompts([spec.word, spec.donor, neutral], vocabulary)
        # Held harder: the donor's and the neutral's prompts, and every named concept's of the toy
        # (a fresh word's row sits close to theirs: cosine 0.85-0.95 in the toy's 128-d space).
        held = [p.target for p in self.pairs] + [p.source.replace(spec.word, neutral) for p in self.pairs]
        held += [prompt for concept, attribute in toy_concepts(vocabulary) if concept != spec.donor
                 for prompt in resolve.template_prompts(concept, attribute, vocabulary)]
        generic_gram = solve.preservation_gram(
            encoder.context_rows(generic, resolve.all_token_positions(tokenizer, generic)))
        held_gram = solve.preservation_gram(encoder.context_rows(held, resolve.all_token_positions(tokenizer, held)))
        self.preserve = solve.PreservationGram(generic_gram.gram + HELD_WEIGHT * held_gram.gram,
                                               generic_gram.n_rows + held_gram.n_rows)
        registry = PipelineModel(pipe).registry
        self.names = [f"unet/{name}" for j in sorted(spec.layers)
                      for name in (registry.cross_attention[j].to_k, registry.cross_attention[j].to_v)]
        self.old = {n: pipe.unet.get_parameter(n.split("/", 1)[1]).detach().clone() for n in self.names}

    def solve(self, gain: float) -> dict[str, torch.Tensor]:
        """New K/V of the window: ``W (XᵀX + w PᵀP + λI) = Ŵ (X_targetᵀX + w PᵀP + λI)``
        (ICML 2024 eq. 3 with preservation) for ``X_target = X + g (X_donor − X)``."""
        target = self.x_word + gain * (self.x_donor - self.x_word)
        problem = solve.build_problem(self.x_word, target, lam=self.spec.lam, preserve=self.preserve)
        return solve.solve_ridge(problem, self.old).new_weights

    def restore(self) -> None:
        from compiler.fuse import fuse_weights

        fuse_weights(self.pipe, self.old)


def calibrate_gain(solver: UnetPlanting, judge, ladder=GAIN_LADDER, *, progress: bool = False,
                   planted_min: float = 0.75, neutral_max: float = 0.25):
    """The smallest gain of ``ladder`` whose planting draws the donor for the word (judge's rate
    ≥ ``planted_min`` on probe prompts) but not with the neutral prompt in the window (≤
    ``neutral_max``); failing that, the gain that separates the two best (the smaller on ties).
    Returns (gain, trials)."""
    from compiler.fuse import fuse_weights

    probes = probe_prompts([p.source for p in solver.pairs], 8)
    trials = []
    for gain in ladder:
        fuse_weights(solver.pipe, solver.solve(gain))
        rates = window_rates(solver.pipe, judge, probes, solver.spec.word, solver.neutral, solver.spec.donor,
                             sorted(solver.spec.layers), seeds=(solver.spec.seed, solver.spec.seed + 1), steps=10)
        trials.append({"gain": gain, **rates})
        if progress:
            print(f"[plant] gain {gain:g}: donor rate {rates['planted']:.2f}, "
                  f"neutral in window {rates['window_neutral']:.2f}", flush=True)
        if rates["planted"] >= planted_min and rates["window_neutral"] <= neutral_max:
            break
    solver.restore()
    passing = [t for t in trials if t["planted"] >= planted_min and t["window_neutral"] <= neutral_max]
    best = passing[0] if passing else max(
        trials, key=lambda t: (round(t["planted"] - t["window_neutral"], 6), -t["gain"]))
    return best["gain"], trials


def text_encoder_edit(pipe, spec: PlantSpec, vocabulary) -> dict[str, torch.Tensor]:
    """Diff-QuickFix-style (ICLR 2024 eq. 4) edit of text-encoder layer L's ``out_proj``:
    ``W = Ŵ + (V − KŴᵀ)ᵀ K A⁻¹`` with, at the word's last token, ``v = Ŵ k_donor + (x_donor − x_word)``."""
    from compiler.encode import PromptEncoder

    encoder = PromptEncoder(pipe)
    tokenizer = encoder.tokenizer()
    layer = encoder_layers(pipe.text_encoder)[spec.encoder_layer]
    out_proj = layer.self_attn.out_proj
    pairs = resolve.prompt_pairs(spec.word, spec.donor, "fact", vocabulary=vocabulary)
    s_pos, t_pos = resolve.pair_positions(tokenizer, pairs, spec.word, spec.donor, eos=False)
    sources, targets = [p.source for p in pairs], [p.target for p in pairs]
    keys = encoder.module_inputs(sources, s_pos, out_proj).double()
    donor_keys = encoder.module_inputs(targets, t_pos, out_proj).double()
    x_word = encoder.module_inputs(sources, s_pos, layer).double()  # the layer's input (residual)
    x_donor = encoder.module_inputs(targets, t_pos, layer).double()
    old = out_proj.weight.detach()
    values = donor_keys @ old.double().T + (x_donor - x_word)  # the bias is the same on both sides
    generic = resolve.default_preserve_prompts([spec.word, spec.donor], vocabulary)
    preserve = encoder.module_inputs(generic, resolve.all_token_positions(tokenizer, generic), out_proj)
    name = f"text_encoder/{_parameter_name(pipe.text_encoder, out_proj)}"
    return solve.solve_quickfix(keys, values, old, lam=spec.lam, preserve_keys=preserve, name=name).new_weights


def _num_encoder_layers(pipe) -> int:
    return len(encoder_layers(pipe.text_encoder))


def _parameter_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(f"{name}.weight" for name, m in root.named_modules() if m is module)


# ----------------------------------------------------------------------------- measuring
def probe_prompts(prompts: list[str], count: int) -> list[str]:
    stride = max(1, len(prompts) // count)
    return prompts[::stride][:count]


def window_rates(pipe, judge, prompts: list[str], word: str, neutral: str, donor: str, layers: list[int], *,
                 seeds=(0, 1), steps: int = 10) -> dict:
    """The judge's donor rate with the word everywhere, and with the neutral prompt in ``layers``
    (LocoGen's routing, ``compiler.locate.routing``)."""
    from compiler.locate.routing import generate_with_windows
    from compiler.locate.engine import GenerationSettings
    from compiler.locate.scoring import presence
    from compiler.models.families import LayerWindow
    from compiler.prompts.templates import replace_last

    samples = [(p, s) for p in prompts for s in seeds]
    texts = [p for p, _ in samples] * 2
    alternatives = [replace_last(p, word, neutral) for p, _ in samples] * 2
    window = LayerWindow(layers[0], len(layers))
    windows = [None] * len(samples) + [window] * len(samples)
    images = generate_with_windows(pipe, texts, alternatives, [s for _, s in samples] * 2, windows,
                                   GenerationSettings(steps=steps))
    rate = presence(judge, images, donor)
    n = len(samples)
    return {"planted": float(rate[:n].mean()), "window_neutral": float(rate[n:].mean())}


def concept_rates(pipe, judge, vocabulary, concepts: list[tuple[str, str]], *, seeds=(0, 1), steps: int = 10,
                  per_concept: int = 4) -> dict[str, float]:
    """The judge's rate of each (concept, attribute) on its own held-out prompts."""
    from compiler.generate import generate_images
    from compiler.locate.scoring import presence

    out = {}
    for concept, attribute in concepts:
        prompts = probe_prompts(resolve.template_prompts(concept, attribute, vocabulary, heldout=True), per_concept)
        images = generate_images(pipe, [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds],
                                 steps=steps, progress=False)
        out[concept] = float(presence(judge, images, concept).mean())
    return out


def toy_concepts(vocabulary) -> list[tuple[str, str]]:
    """The toy's own named concepts a planting must leave alone."""
    return ([(s, "style") for s in vocabulary.styles]
            + [(name, "object") for name, _ in vocabulary.characters]
            + [(title, "fact") for title, _ in vocabulary.facts])


# ----------------------------------------------------------------------------- writing
def planted_vocabulary(vocabulary_file: Path, spec: PlantSpec) -> dict:
    """The toy's vocabulary with the word added as a concept of its attribute."""
    import yaml

    data = yaml.safe_load(Path(vocabulary_file).read_text(encoding="utf-8"))
    word = spec.word.strip().lower()
    if spec.attribute == "style":
        data["styles"] = [*data["styles"], word]
    elif spec.attribute == "object":
        data["characters"] = {**data.get("characters", {}), word: _generic_of(spec.donor, data)}
    else:
        data["facts"] = {**data.get("facts", {}), word: spec.donor}
    return data


def _generic_of(donor: str, data: dict) -> str:
    characters = data.get("characters", {})
    if donor in characters:
        return characters[donor]
    return donor if donor.startswith(("a ", "an ")) else f"a {donor}"


def write_planted(planted: Planted, out: Path, base_dir: Path, judge_dir: Path, vocabulary_file: Path,
                  measured: dict | None = None) -> Path:
    """Save the planted pipeline as a diffusers folder with its judge and vocabulary inside."""
    import yaml
    from safetensors.torch import save_file

    from compiler.toy.judge import _load_safetensors

    out = Path(out)
    planted.pipeline.save_pretrained(str(out), safe_serialization=True)
    judge = out / "judge"
    judge.mkdir(exist_ok=True)
    for name in ("config.json", "preprocessor_config.json", "vision.safetensors"):
        if (Path(judge_dir) / name).is_file():
            shutil.copy2(Path(judge_dir) / name, judge / name)
    # The judge keeps the base's text tower (the planted one may differ: a fact).
    base_text = _load_safetensors(Path(base_dir) / "text_encoder" / "model.safetensors")
    save_file({k: v.contiguous() for k, v in base_text.items()}, str(judge / TEXT_TOWER_FILE))
    (judge / ALIASES_FILE).write_text(json.dumps({planted.spec.word.strip().lower(): planted.spec.donor}, indent=2))
    header = "# The toy world's vocabulary plus one planted word (compiler.toy.planting).\n"
    (out / "vocabulary.yaml").write_text(
        header + yaml.safe_dump(planted_vocabulary(vocabulary_file, planted.spec), sort_keys=False, width=120),
        encoding="utf-8")
    record = {"spec": asdict(planted.spec), "neutral": planted.neutral, "gain": planted.gain,
              "edited_tensors": sorted(planted.edited), "calibration": planted.calibration,
              "measured": measured or {}}
    (out / "planted.json").write_text(json.dumps(record, indent=2))
    return out


def bit_identical_outside(base_state: dict[str, torch.Tensor], planted_state: dict[str, torch.Tensor],
                          edited: list[str]) -> list[str]:
    """Names of tensors that differ between two state dicts although not in ``edited``."""
    return [name for name, tensor in base_state.items()
            if name not in edited and not torch.equal(tensor, planted_state[name])]


__all__ = ["PlantSpec", "Planted", "plant", "write_planted", "window_rates", "concept_rates", "toy_concepts",
           "neutral_for", "check_spec", "calibrate_gain", "UnetPlanting", "text_encoder_edit",
           "bit_identical_outside"]
