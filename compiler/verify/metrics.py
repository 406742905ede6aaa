"""Generate every probe image on both models, then score each group base vs edited.

Per image, the judge gives: the label it identifies (style or subject), whether that is the
probe's subject (and, in the edit groups, the replacement), and the CLIP-score against the
prompt (and against the target prompt). Per group, these become accuracies and mean
CLIP-scores for each model, plus the *feature distance*: the mean ``1 - cos`` between the base
and the edited image of the same prompt and seed in the judge's image space (0 = unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from compiler.generate import generate_images
from compiler.verify.judges import STYLE, SUBJECT, Judge
from compiler.verify.probes import ProbeGroup, VerifyPlan


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """One image per (prompt, seed) of a plan, from one model."""

    keys: list[tuple[str, int]]
    images: np.ndarray  # uint8 (N, H, W, 3), in the order of ``keys``
    index: dict[tuple[str, int], int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {key: i for i, key in enumerate(self.keys)}

    def rows(self, prompts_and_seeds: list[tuple[str, int]]) -> list[int]:
        return [self.index[key] for key in prompts_and_seeds]


def generate_plan_images(pipe, plan: VerifyPlan, *, steps: int, guidance: float, batch: int,
                         progress: tqdm | None = None) -> ImageSet:
    """All of a plan's images from one model, ``batch`` at a time (few pipeline calls)."""
    keys = plan.image_keys()
    chunks = []
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        chunks.append(generate_images(pipe, [p for p, _ in chunk], [s for _, s in chunk], steps=steps,
                                      guidance=guidance, batch=batch, progress=False))
        if progress is not None:
            progress.update(len(chunk))
    return ImageSet(keys, np.concatenate(chunks))


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@dataclass
class ModelScores:
    """One model's numbers on one group.

    ``accuracy``: fraction of images in which the judge identifies the probe's subject.
    ``replacement_accuracy``: fraction showing the replacement (edit groups only).
    ``clip_prompt``: mean CLIP-score against the image's own prompt; ``clip_target``: against
    the same template filled with the replacement (edit groups only).
    """

    accuracy: float
    replacement_accuracy: float | None
    clip_prompt: float
    clip_target: float | None


@dataclass
class SubjectScores:
    """Accuracy per probed subject of a group (e.g. per neighbour)."""

    subject: str
    images: int
    base_accuracy: float
    edited_accuracy: float


@dataclass
class ImageScores:
    label: str  # what the judge identifies in the image
    shows_subject: bool
    shows_replacement: bool | None
    clip_prompt: float
    clip_target: float | None


@dataclass
class Sample:
    """One prompt and seed: the base image's and the edited image's scores."""

    prompt: str
    seed: int
    subject: str
    base: ImageScores
    edited: ImageScores
    feature_distance: float


@dataclass
class GroupResult:
    name: str
    key: str
    edit_index: int | None
    description: str
    prompts: list[str]
    seeds: list[int]
    base: ModelScores
    edited: ModelScores
    feature_distance: float
    subjects: list[SubjectScores]
    samples: list[Sample]
    # Images in prompt-major, seed-minor order (len(prompts) x len(seeds)); not serialized.
    base_images: np.ndarray = field(repr=False)
    edited_images: np.ndarray = field(repr=False)

    @property
    def accuracy_drop(self) -> float:
        return self.base.accuracy - self.edited.accuracy


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


@dataclass
class ModelView:
    """One model's images with the judge's features and identifications (per kind, per image),
    computed once (:meth:`judged`) or read back from the verify cache."""

    images: ImageSet
    features: torch.Tensor
    labels: dict[str, list[str]]

    @classmethod
    @torch.no_grad()
    def judged(cls, images: ImageSet, judge: Judge, candidates: dict[str, tuple[str, ...]]) -> ModelView:
        features = judge.embed_images(images.images)
        return cls(images, features,
                   {kind: list(judge.identify(features, kind, candidates[kind])) for kind in (STYLE, SUBJECT)})


def score_group(group: ProbeGroup, seeds: tuple[int, ...], base: ModelView, edited: ModelView, judge: Judge,
                clip_scale: float) -> GroupResult:
    keys = [(probe.prompt, seed) for probe in group.probes for seed in seeds]
    probes = [probe for probe in group.probes for _ in seeds]
    base_rows, edited_rows = base.images.rows(keys), edited.images.rows(keys)
    has_target = all(probe.target_prompt for probe in group.probes)

    def image_scores(view: ModelView, rows: list[int]) -> list[ImageScores]:
        features = view.features[rows]
        clip_prompt = judge.clip_scores(features, [p.prompt for p in probes]) * clip_scale
        clip_target = judge.clip_scores(features, [p.target_prompt for p in probes]) * clip_scale if has_target else None
        out = []
        for i, (probe, row) in enumerate(zip(probes, rows)):
            label = view.labels[probe.kind][row]
            out.append(ImageScores(
                label=label,
                shows_subject=label == judge.label_of(probe.subject, probe.kind),
                shows_replacement=(label == judge.label_of(probe.replacement, probe.kind)) if probe.replacement else None,
                clip_prompt=float(clip_prompt[i]),
                clip_target=float(clip_target[i]) if clip_target is not None else None,
            ))
        return out

    base_scores, edited_scores = image_scores(base, base_rows), image_scores(edited, edited_rows)
    distances = (1 - (base.features[base_rows] * edited.features[edited_rows]).sum(-1)).clamp(min=0).tolist()
    samples = [Sample(prompt, seed, probe.subject, b, e, float(d))
               for (prompt, seed), probe, b, e, d in zip(keys, probes, base_scores, edited_scores, distances)]

    def summary(scores: list[ImageScores]) -> ModelScores:
        return ModelScores(
            accuracy=_mean(s.shows_subject for s in scores),
            replacement_accuracy=_mean(s.shows_replacement for s in scores) if has_target else None,
            clip_prompt=_mean(s.clip_prompt for s in scores),
            clip_target=_mean(s.clip_target for s in scores) if has_target else None,
        )

    subjects = []
    for subject in dict.fromkeys(probe.subject for probe in group.probes):
        mine = [s for s in samples if s.subject == subject]
        subjects.append(SubjectScores(subject, len(mine), _mean(s.base.shows_subject for s in mine),
                                      _mean(s.edited.shows_subject for s in mine)))
    return GroupResult(
        name=group.name, key=group.key, edit_index=group.edit_index, description=group.description,
        prompts=[probe.prompt for probe in group.probes], seeds=list(seeds),
        base=summary(base_scores), edited=summary(edited_scores), feature_distance=_mean(distances),
        subjects=subjects, samples=samples,
        base_images=base.images.images[base_rows], edited_images=edited.images.images[edited_rows],
    )


@torch.no_grad()
def score_plan(plan: VerifyPlan, base_images: ImageSet | ModelView, edited_images: ImageSet | ModelView,
               judge: Judge, clip_scale: float = 1.0) -> list[GroupResult]:
    """Score every group of the plan, base vs edited (images, or images already judged)."""
    base, edited = (view if isinstance(view, ModelView) else ModelView.judged(view, judge, plan.candidates)
                    for view in (base_images, edited_images))
    return [score_group(group, plan.seeds, base, edited, judge, clip_scale) for group in plan.groups]
