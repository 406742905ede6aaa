"""Many concepts in one solve (issue 25): the row rules that keep a recipe of many concepts at
single-concept quality, checked on rows and on the quick toy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from compiler import resolve
from compiler.methods import rows as shared
from compiler.plan import compose_targets


def _plan(concept, replacement, pairs):
    return SimpleNamespace(edit=SimpleNamespace(concept=concept, replacement=replacement),
                           pairs=[resolve.PromptPair(s, t) for s, t in pairs])


def test_targets_name_no_other_edited_concept():
    """An edit's target that names another edited concept gets that edit's replacement too."""
    snoopy = _plan("snoopy", "a dog", [("a photo of snoopy in the style of van gogh",
                                         "a photo of a dog in the style of van gogh"),
                                        ("a photo of snoopy", "a photo of a dog")])
    gogh = _plan("van gogh", "a painting", [("a red circle in the style of Van Gogh",
                                             "a red circle in the style of a painting")])
    alone = _plan("snoopy", "a dog", [("snoopy, van gogh", "a dog, van gogh")])
    compose_targets([alone])
    assert alone.pairs[0].target == "a dog, van gogh"  # one edit: its pairs as they were
    compose_targets([snoopy, gogh])
    assert [p.target for p in snoopy.pairs] == ["a photo of a dog in the style of a painting", "a photo of a dog"]
    assert snoopy.pairs[0].source == "a photo of snoopy in the style of van gogh"
    assert gogh.pairs[0].target == "a red circle in the style of a painting"


def test_padding_rows_are_compressed_by_default_and_every_row_on_request(monkeypatch):
    monkeypatch.delenv("EDITC_PADDING_DIRECTIONS", raising=False)
    assert shared.padding_directions() == shared.PADDING_DIRECTIONS == 8
    monkeypatch.setenv("EDITC_PADDING_DIRECTIONS", "0")
    assert shared.padding_directions() is None


def test_padding_directions_keep_the_statistics_the_solve_reads():
    """Compressing each prompt's padding rows to its leading directions keeps the subject and
    EOS rows as they are and the padding rows' Gram and shift to the energy left out: exact with
    as many directions as the width, close with a few on smooth (low-rank) padding states."""
    g = torch.Generator().manual_seed(0)
    d, pad = 16, 60
    # Smooth padding states: a low-rank drift plus a little noise, as CLIP's after EOS are.
    basis = torch.randn(3, d, generator=g)
    drift = torch.stack([torch.linspace(0, 1, pad) ** k for k in range(3)], 1)
    prompts = []
    for _ in range(4):
        own = torch.randn(2, d, generator=g)
        padding = drift @ (basis + 0.1 * torch.randn(3, d, generator=g)) + 0.01 * torch.randn(pad, d, generator=g)
        prompts.append(torch.cat([own, padding]))
    source = torch.cat(prompts)
    target = source + 0.3 * torch.randn(source.shape, generator=g)

    def stats(s, t):
        s, t = s.double(), t.double()
        return s.T @ s, s.T @ (t - s)

    full_gram, full_shift = stats(source, target)
    for k, tol in ((d, 1e-6), (4, 2e-3)):
        cs, ct, mask = shared.compress_padding(source, target, [2 + pad] * 4, 2, k)
        assert len(cs) == 4 * (2 + k) and int(mask.sum()) == 4 * k
        assert torch.equal(cs[:2], source[:2]) and torch.equal(ct[:2], target[:2])
        gram, shift = stats(cs, ct)
        assert (gram - full_gram).norm() / full_gram.norm() < tol
        assert (shift - full_shift).norm() / full_shift.norm() < max(tol, 0.05)
    cs, _, _ = shared.compress_padding(source, target, [2 + pad] * 4, 2, 1)
    assert (stats(cs, target[: len(cs)])[0] - full_gram).norm() / full_gram.norm() > 1e-3  # one is too few


RECIPE = """
model: {model}
lambda: 0.01
neighbours: 0
edits:
{edits}"""
EDIT = """  - concept: {concept}
    replacement: {replacement}
    attribute: {attribute}
    method: locoedit
    layers: [2, 3, 4]
"""
GOGH = dict(concept="van gogh", replacement="a painting", attribute="style")
SNOOPY = dict(concept="snoopy", replacement="a dog", attribute="object")


def _gaps_left(model, recipe_text, tmp_path, concepts):
    """Each concept's held-out K/V gap left after the recipe's solve (bench/many_concepts.py's
    measure, on the edited layers; targets composed with the recipe's other edits): 0 = mapped
    onto the replacement, 1 = unmoved. Also the solve's row count."""
    from compiler import compile as compile_stage
    from compiler.encode import PromptEncoder
    from compiler.prompts.templates import mentions, replace_phrase
    from compiler.recipe import loads_recipe

    recipe = loads_recipe(recipe_text, str(tmp_path / "r.yaml"))
    plans = compile_stage.plan_edits(recipe, model)
    result = compile_stage.compile_edits(recipe, model, plans)
    encoder = PromptEncoder(model)
    vocabulary = resolve.vocabulary_of(model)
    names = sorted(result.new_tensors)
    old = model.read_tensors(names)
    gaps = {}
    for c in concepts:
        pairs = resolve.prompt_pairs(c["concept"], c["replacement"], c["attribute"], vocabulary=vocabulary,
                                     heldout=True)[::3]
        for other in concepts:
            pairs = [resolve.PromptPair(p.source, replace_phrase(p.target, other["concept"], other["replacement"]))
                     if other is not c and mentions(p.target, other["concept"]) else p for p in pairs]
        s_pos, t_pos = resolve.pair_positions(encoder.tokenizer(), pairs, c["concept"], c["replacement"], True,
                                              encoder.max_length)
        x_src = encoder.context_rows([p.source for p in pairs], s_pos).double()
        x_tgt = encoder.context_rows([p.target for p in pairs], t_pos).double()
        left = sum(float(((x_src @ result.new_tensors[n].double().T - x_tgt @ old[n].double().T) ** 2).sum())
                   for n in names)
        gap = sum(float(((x_src @ old[n].double().T - x_tgt @ old[n].double().T) ** 2).sum()) for n in names)
        gaps[c["concept"]] = (left / gap) ** 0.5
    return gaps, result.solve_info[0]["rows"]


@pytest.mark.slow
def test_padding_directions_give_every_padding_rows_gaps_from_far_fewer_rows(quick_toy, tmp_path, monkeypatch):
    """The issue-25 row rule on the quick toy, van gogh and snoopy in one solve: 8 padding
    directions per prompt give the held-out gaps of every padding row (within 0.05; measured
    with the found neighbours held: 0.620 / 0.713 against 0.618 / 0.710, without them 0.03
    apart) from more than 5× fewer rows (1,860 against 12,326). Slow (two cold compiles of
    186 prompts × 77 tokens, ~70 s under load); the fast tests above check the rule's parts."""
    from compiler.models.selective import open_model

    model = open_model(str(quick_toy))
    both = RECIPE.format(model=quick_toy, edits=EDIT.format(**GOGH) + EDIT.format(**SNOOPY))
    now, rows = _gaps_left(model, both, tmp_path, [GOGH, SNOOPY])
    monkeypatch.setenv("EDITC_PADDING_DIRECTIONS", "0")
    every_row, all_rows = _gaps_left(model, both, tmp_path, [GOGH, SNOOPY])
    print("now", now, rows, "every padding row", every_row, all_rows)
    assert all_rows > 5 * rows, (rows, all_rows)
    for concept in now:
        assert abs(now[concept] - every_row[concept]) < 0.05, (concept, now, every_row)
        assert now[concept] < 0.9, now  # the edit moved the concept
