"""The closed-form solver against float64 references, on random data (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import compiler.solve as solve
from compiler.errors import UserError
from compiler.solve import (
    NonFiniteInputError,
    RidgeProblem,
    ablate_neurons,
    build_problem,
    combine_problems,
    factorize,
    neuron_zscores,
    solve_quickfix,
    solve_value_heads,
    solve_ridge,
    solve_ridge_stacked,
    solve_ridge_unshared,
    solve_values,
    zscore_neurons,
)

LAM = 0.01


def _rand(generator: torch.Generator, *shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _layers(generator: torch.Generator, dim: int, out_dims=(24, 40, 56), dtype=torch.float64):
    """K and V weights of a few 'cross-attention layers' reading the same context dimension."""
    weights = {}
    for index, out_dim in enumerate(out_dims):
        for kind in ("to_k", "to_v"):
            weights[f"layer{index}.{kind}"] = _rand(generator, out_dim, dim, dtype=dtype) / dim**0.5
    return weights


def _lstsq_reference(x_orig, x_target, old, lam, preserve=None, preserve_weight=1.0):
    """argmin_W ‖X_orig Wᵀ − X_target Ŵᵀ‖² + λ‖W − Ŵ‖² + w‖P Wᵀ − P Ŵᵀ‖², as augmented least
    squares with sqrt(λ) rows, solved by numpy's lstsq in float64."""
    x_orig, x_target, old = (t.double().numpy() for t in (x_orig, x_target, old))
    dim = x_orig.shape[1]
    design = [x_orig, np.sqrt(lam) * np.eye(dim)]
    response = [x_target @ old.T, np.sqrt(lam) * old.T]
    if preserve is not None:
        kept = preserve.double().numpy()
        design.append(np.sqrt(preserve_weight) * kept)
        response.append(np.sqrt(preserve_weight) * kept @ old.T)
    solution, *_ = np.linalg.lstsq(np.vstack(design), np.vstack(response), rcond=None)
    return solution.T


# --------------------------------------------------------------------------------------------
# LocoEdit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,dim,n_preserve",
    [(12, 48, 0), (12, 48, 20), (90, 32, 0), (90, 32, 40)],
    ids=["N<d", "N<d+preserve", "N>d", "N>d+preserve"],
)
def test_locoedit_matches_numpy_lstsq(rows, dim, n_preserve):
    generator = torch.Generator().manual_seed(rows * 1000 + dim + n_preserve)
    x_orig, x_target = _rand(generator, rows, dim), _rand(generator, rows, dim)
    preserve = _rand(generator, n_preserve, dim) if n_preserve else None
    weights = _layers(generator, dim)
    problem = build_problem(x_orig, x_target, LAM, preserve=preserve, preserve_weight=2.5)
    result = solve_ridge(problem, weights)
    for name, old in weights.items():
        reference = _lstsq_reference(x_orig, x_target, old, LAM, preserve, 2.5)
        got = result.new_weights[name].numpy()
        assert np.abs(got - reference).max() <= 1e-8 * max(1.0, np.abs(reference).max())


def test_normal_equations_hold():
    """The gradient of the objective vanishes at the solution (relative to its size at Ŵ)."""
    generator = torch.Generator().manual_seed(1)
    x_orig, x_target, preserve = (_rand(generator, 20, 64), _rand(generator, 20, 64), _rand(generator, 30, 64))
    weights = _layers(generator, 64)
    result = solve_ridge(build_problem(x_orig, x_target, LAM, preserve=preserve), weights)

    def gradient(new, old):
        # ∂/∂W [‖X_o Wᵀ − X_t Ŵᵀ‖² + λ‖W − Ŵ‖² + ‖P Wᵀ − P Ŵᵀ‖²] / 2
        return (
            (x_orig @ new.T - x_target @ old.T).T @ x_orig
            + LAM * (new - old)
            + (preserve @ new.T - preserve @ old.T).T @ preserve
        )

    for name, old in weights.items():
        at_solution = gradient(result.new_weights[name], old).norm()
        at_start = gradient(old, old).norm()
        assert at_solution <= 1e-10 * at_start


def test_shared_factorization_equals_per_layer_solves():
    generator = torch.Generator().manual_seed(2)
    x_orig, x_target = _rand(generator, 40, 64), _rand(generator, 40, 64)
    weights = _layers(generator, 64, out_dims=(32, 64, 128, 64, 32))
    problem = build_problem(x_orig, x_target, LAM, preserve=_rand(generator, 10, 64))
    batched = solve_ridge(problem, weights)
    unshared = solve_ridge_unshared(problem, weights)
    stacked = solve_ridge_stacked(problem, weights)
    for name, old in weights.items():
        alone = solve_ridge(problem, {name: old}).new_weights[name]
        assert torch.equal(batched.new_weights[name], alone)  # batching changes nothing
        scale = alone.abs().max()
        assert (unshared.new_weights[name] - alone).abs().max() <= 1e-10 * scale
        assert (stacked.new_weights[name] - alone).abs().max() <= 1e-10 * scale


def test_one_factorization_serves_all_layers_and_100_concepts(monkeypatch):
    """A 100-concept recipe (21 rows each) over 16 layers × K and V is one factorisation."""
    generator = torch.Generator().manual_seed(3)
    dim = 48
    per_concept = [
        build_problem(_rand(generator, 21, dim), _rand(generator, 21, dim), LAM) for _ in range(100)
    ]
    problem = combine_problems(per_concept)
    assert problem.n_rows == 2100
    weights = _layers(generator, dim, out_dims=(8, 16, 24, 16) * 4)
    assert len(weights) == 32
    calls = []
    real_factorize = solve.factorize
    monkeypatch.setattr(solve, "factorize", lambda *a, **k: calls.append(1) or real_factorize(*a, **k))
    result = solve_ridge(problem, weights)
    assert len(calls) == 1
    assert set(result.new_weights) == set(weights)
    assert result.n_rows == 2100


def test_combined_problems_equal_concatenated_rows():
    generator = torch.Generator().manual_seed(4)
    blocks = [(_rand(generator, 7, 32), _rand(generator, 7, 32)) for _ in range(5)]
    combined = combine_problems([build_problem(o, t, LAM) for o, t in blocks])
    concatenated = build_problem(
        torch.cat([o for o, _ in blocks]), torch.cat([t for _, t in blocks]), LAM
    )
    assert torch.allclose(combined.gram, concatenated.gram, rtol=0, atol=1e-12)
    assert torch.allclose(combined.shift, concatenated.shift, rtol=0, atol=1e-12)
    assert combined.n_rows == concatenated.n_rows == 35
    with pytest.raises(ValueError, match="λ"):
        combine_problems([build_problem(*blocks[0], LAM), build_problem(*blocks[1], 0.1)])


def test_row_weights_give_an_edit_its_own_lambda():
    """Weighting rows by λ_recipe/λ_edit equals solving that edit alone with λ_edit."""
    generator = torch.Generator().manual_seed(5)
    x_orig, x_target = _rand(generator, 10, 32), _rand(generator, 10, 32)
    weights = _layers(generator, 32)
    own = solve_ridge(build_problem(x_orig, x_target, 0.5), weights)
    weighted = solve_ridge(build_problem(x_orig, x_target, LAM, row_weights=LAM / 0.5), weights)
    for name in weights:
        assert torch.allclose(own.new_weights[name], weighted.new_weights[name], rtol=0, atol=1e-10)


def test_problem_cross_is_the_papers_term():
    generator = torch.Generator().manual_seed(6)
    x_orig, x_target, kept = _rand(generator, 9, 16), _rand(generator, 9, 16), _rand(generator, 4, 16)
    problem = build_problem(x_orig, x_target, LAM, preserve=kept, preserve_weight=3.0)
    assert isinstance(problem, RidgeProblem) and problem.dim == 16
    assert torch.allclose(problem.gram, x_orig.T @ x_orig + 3.0 * kept.T @ kept, atol=1e-12)
    assert torch.allclose(problem.cross, x_orig.T @ x_target + 3.0 * kept.T @ kept, atol=1e-12)


def test_edit_maps_concept_onto_target_and_leaves_the_rest(capsys):
    """The edited weight sends X_orig where the old weight sent X_target (small λ, N < d),
    preserved rows keep their outputs, and directions orthogonal to all rows do not move."""
    generator = torch.Generator().manual_seed(7)
    rows, dim = 21, 128
    x_orig, x_target = _rand(generator, rows, dim), _rand(generator, rows, dim)
    preserve = _rand(generator, 30, dim)
    weights = _layers(generator, dim)
    result = solve_ridge(build_problem(x_orig, x_target, 1e-4, preserve=preserve), weights)
    bare = solve_ridge(build_problem(x_orig, x_target, 1e-4), weights)
    # Directions orthogonal to the span of the edit rows (no preservation rows).
    basis, _ = torch.linalg.qr(torch.cat([x_orig, x_target]).T, mode="complete")
    unrelated = basis[:, 2 * rows :].T  # (d − 2N) × d, orthonormal, ⟂ X_orig and X_target
    report = []
    for name, old in weights.items():
        wanted = x_target @ old.T
        edit_error = ((x_orig @ result.new_weights[name].T - wanted).norm() / wanted.norm()).item()
        kept_error = (
            (preserve @ result.new_weights[name].T - preserve @ old.T).norm() / (preserve @ old.T).norm()
        ).item()
        moved = ((unrelated @ bare.new_weights[name].T - unrelated @ old.T).norm() / (unrelated @ old.T).norm()).item()
        report.append((name, edit_error, kept_error, moved))
        assert edit_error < 1e-3
        assert kept_error < 1e-3
        assert moved < 1e-8  # zero up to float64 rounding amplified by 1/λ
    with capsys.disabled():
        worst = max(report, key=lambda r: r[1])
        print(
            f"\n[solve] N={rows} d={dim} λ=1e-4: relative error on the edit rows ≤ {worst[1]:.2e}, "
            f"preserved rows moved ≤ {max(r[2] for r in report):.2e}, "
            f"orthogonal directions moved ≤ {max(r[3] for r in report):.2e}"
        )


def test_no_change_requested_gives_the_old_weights_bit_for_bit():
    generator = torch.Generator().manual_seed(8)
    x_orig = _rand(generator, 10, 32)
    weights = _layers(generator, 32, dtype=torch.float16)
    result = solve_ridge(build_problem(x_orig, x_orig.clone(), LAM), weights)
    for name, old in weights.items():
        assert torch.equal(result.new_weights[name], old)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_weights_come_back_in_their_dtype(dtype):
    generator = torch.Generator().manual_seed(9)
    x_orig, x_target = _rand(generator, 12, 64, dtype=dtype), _rand(generator, 12, 64, dtype=dtype)
    weights = _layers(generator, 64, dtype=dtype)
    result = solve_ridge(build_problem(x_orig, x_target, LAM), weights)
    reference = solve_ridge(
        build_problem(x_orig.double(), x_target.double(), LAM), {k: v.double() for k, v in weights.items()}
    )
    for name, old in weights.items():
        new = result.new_weights[name]
        assert new.dtype == dtype and new.shape == old.shape and new.device == old.device
        # Computed in float64, rounded once: equals the float64 solution cast to the dtype.
        assert torch.equal(new, reference.new_weights[name].to(dtype))


def test_deterministic_bit_identical():
    generator = torch.Generator().manual_seed(10)
    x_orig, x_target, kept = _rand(generator, 50, 96), _rand(generator, 50, 96), _rand(generator, 20, 96)
    weights = _layers(generator, 96, dtype=torch.float32)
    first = solve_ridge(build_problem(x_orig, x_target, LAM, preserve=kept), weights)
    second = solve_ridge(build_problem(x_orig, x_target, LAM, preserve=kept), weights)
    for name in weights:
        assert torch.equal(first.new_weights[name], second.new_weights[name])
    assert first.condition_number == second.condition_number


def test_condition_number_reported():
    generator = torch.Generator().manual_seed(11)
    x_orig, x_target = _rand(generator, 20, 64), _rand(generator, 20, 64)
    problem = build_problem(x_orig, x_target, LAM)
    result = solve_ridge(problem, _layers(generator, 64))
    expected = np.linalg.cond(problem.normal_matrix().numpy())
    assert result.condition_number == pytest.approx(expected, rel=1e-8)
    estimate = factorize(problem.normal_matrix(), condition="estimate").condition_number
    assert estimate == pytest.approx(expected, rel=1e-2)
    assert result.seconds > 0 and {"factorize", "apply"} <= set(result.timings)


@pytest.mark.parametrize("where", ["x_orig", "x_target", "preserve", "weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused(where, bad):
    generator = torch.Generator().manual_seed(12)
    x_orig, x_target, kept = _rand(generator, 5, 16), _rand(generator, 5, 16), _rand(generator, 5, 16)
    weights = _layers(generator, 16)
    {"x_orig": x_orig, "x_target": x_target, "preserve": kept, "weight": weights["layer0.to_k"]}[where][1, 2] = bad
    with pytest.raises(NonFiniteInputError, match="NaN/Inf") as err:
        solve_ridge(build_problem(x_orig, x_target, LAM, preserve=kept), weights)
    assert isinstance(err.value, UserError)  # the CLI shows it as one line, exit 2


def test_bad_arguments_are_refused():
    generator = torch.Generator().manual_seed(13)
    x_orig, x_target = _rand(generator, 5, 16), _rand(generator, 5, 16)
    with pytest.raises(ValueError, match="lam"):
        build_problem(x_orig, x_target, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        build_problem(x_orig, x_target[:4], LAM)
    with pytest.raises(ValueError, match="reads 8 features"):
        solve_ridge(build_problem(x_orig, x_target, LAM), {"w": torch.zeros(4, 8)})


# --------------------------------------------------------------------------------------------
# Diff-QuickFix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,dim_in,dim_out", [(10, 48, 40), (80, 32, 24)], ids=["N<d", "N>d"])
@pytest.mark.parametrize("with_preserve", [False, True])
def test_quickfix_matches_its_formula(rows, dim_in, dim_out, with_preserve):
    generator = torch.Generator().manual_seed(rows + dim_in + with_preserve)
    keys, values = _rand(generator, rows, dim_in), _rand(generator, rows, dim_out)
    old = _rand(generator, dim_out, dim_in)
    kept = _rand(generator, 15, dim_in) if with_preserve else None
    result = solve_quickfix(keys, values, old, LAM, preserve_keys=kept, preserve_weight=2.0)
    new = result.new_weights["out_proj"].numpy()
    # W = (λŴ + Σ v kᵀ + w Σ Ŵ p pᵀ)(λI + Σ k kᵀ + w Σ p pᵀ)⁻¹   (ICLR 2024, eq. 4)
    k, v, w_old = keys.numpy(), values.numpy(), old.numpy()
    numerator = LAM * w_old + v.T @ k
    denominator = LAM * np.eye(dim_in) + k.T @ k
    if kept is not None:
        p = kept.numpy()
        numerator += 2.0 * w_old @ p.T @ p
        denominator += 2.0 * p.T @ p
    formula = np.linalg.solve(denominator.T, numerator.T).T
    assert np.abs(new - formula).max() <= 1e-8 * max(1.0, np.abs(formula).max())
    # and as augmented least squares: rows (k → v), sqrt(λ)(I → Ŵᵀ), sqrt(w)(p → Ŵ p)
    design = [k, np.sqrt(LAM) * np.eye(dim_in)]
    response = [v, np.sqrt(LAM) * w_old.T]
    if kept is not None:
        design.append(np.sqrt(2.0) * p)
        response.append(np.sqrt(2.0) * p @ w_old.T)
    lstsq = np.linalg.lstsq(np.vstack(design), np.vstack(response), rcond=None)[0].T
    assert np.abs(new - lstsq).max() <= 1e-8 * max(1.0, np.abs(lstsq).max())


def test_locoedit_is_solve_values_with_old_outputs_as_values():
    generator = torch.Generator().manual_seed(14)
    x_orig, x_target, kept = _rand(generator, 15, 40), _rand(generator, 15, 40), _rand(generator, 6, 40)
    weights = _layers(generator, 40)
    loco = solve_ridge(build_problem(x_orig, x_target, LAM, preserve=kept), weights)
    values = {name: x_target @ old.T for name, old in weights.items()}
    generic = solve_values(x_orig, values, weights, LAM, preserve_keys=kept)
    for name in weights:
        assert torch.allclose(loco.new_weights[name], generic.new_weights[name], rtol=0, atol=1e-10)


def test_row_weight_equals_repeating_the_row():
    # An edit with its own λ enters the joint solve as a row weight: weight 3 on a key is the
    # same regression as that key written three times.
    generator = torch.Generator().manual_seed(16)
    keys, values, old = _rand(generator, 5, 24), _rand(generator, 5, 20), _rand(generator, 20, 24)
    weighted = solve_quickfix(keys, values, old, LAM, row_weights=torch.tensor([3.0, 1, 1, 1, 1]))
    repeated = solve_quickfix(torch.cat([keys[:1], keys[:1], keys]), torch.cat([values[:1], values[:1], values]),
                              old, LAM)
    assert torch.allclose(weighted.new_weights["out_proj"], repeated.new_weights["out_proj"], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="row_weights"):
        solve_quickfix(keys, values, old, LAM, row_weights=torch.ones(4))


def test_value_heads_solve_each_head_against_lstsq():
    # Diff-QuickFix at v_proj: head h's rows of W read that head's own keys; each block must
    # equal the float64 least-squares reference of its own regression (and no other head's).
    generator = torch.Generator().manual_seed(17)
    heads, rows, dim, head_dim = 3, 7, 20, 6
    keys, target_keys = _rand(generator, heads, rows, dim), _rand(generator, heads, rows, dim)
    kept = _rand(generator, heads, 11, dim)
    old = _rand(generator, heads * head_dim, dim)
    new = solve_value_heads(keys, target_keys, old, LAM, preserve_keys=kept).new_weights["v_proj"].numpy()
    for h in range(heads):
        w_old = old[h * head_dim : (h + 1) * head_dim].numpy()
        k, t, p = keys[h].numpy(), target_keys[h].numpy(), kept[h].numpy()
        design = np.vstack([k, np.sqrt(LAM) * np.eye(dim), p])
        response = np.vstack([t @ w_old.T, np.sqrt(LAM) * w_old.T, p @ w_old.T])
        reference = np.linalg.lstsq(design, response, rcond=None)[0].T
        block = new[h * head_dim : (h + 1) * head_dim]
        assert np.abs(block - reference).max() <= 1e-8 * max(1.0, np.abs(reference).max())
    with pytest.raises(ValueError, match="heads"):
        solve_value_heads(keys, target_keys, old[:-1], LAM)


def test_quickfix_dtype_determinism_and_nan():
    generator = torch.Generator().manual_seed(15)
    keys, values = _rand(generator, 6, 32, dtype=torch.float16), _rand(generator, 6, 32, dtype=torch.float16)
    old = _rand(generator, 32, 32, dtype=torch.float16)
    first = solve_quickfix(keys, values, old)
    second = solve_quickfix(keys, values, old)
    assert first.new_weights["out_proj"].dtype == torch.float16
    assert torch.equal(first.new_weights["out_proj"], second.new_weights["out_proj"])
    keys[0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError):
        solve_quickfix(keys, values, old)


# --------------------------------------------------------------------------------------------
# Neuron-level ablation
# --------------------------------------------------------------------------------------------


def test_zscore_finds_planted_neurons():
    generator = torch.Generator().manual_seed(16)
    without = _rand(generator, 40, 100)
    with_ = _rand(generator, 30, 100)
    planted = torch.tensor([3, 17, 58, 90])
    with_[:, planted[:2]] += 4.0
    with_[:, planted[2:]] -= 4.0  # a strong drop counts as much as a rise
    assert torch.equal(zscore_neurons(with_, without, top_k=4), planted)
    scores = neuron_zscores(with_, without)
    assert scores.shape == (100,) and scores[3] > 10 and scores[58] < -10
    assert torch.equal(zscore_neurons(with_, without, 4), zscore_neurons(with_, without, 4))
    with pytest.raises(ValueError, match="top_k"):
        zscore_neurons(with_, without, 0)


def test_ablation_with_bias_pins_neurons_to_the_neutral_mean():
    generator = torch.Generator().manual_seed(17)
    weight, bias = _rand(generator, 20, 8, dtype=torch.float32), _rand(generator, 20, dtype=torch.float32)
    neutral = _rand(generator, 50, 8, dtype=torch.float32) @ weight.T + bias
    indices = torch.tensor([2, 5, 11])
    original = weight.clone()
    ablation = ablate_neurons(weight, bias, indices, neutral.mean(0))
    assert ablation.mode == "mean"
    inputs = _rand(generator, 7, 8, dtype=torch.float32)
    outputs = inputs @ ablation.weight.T + ablation.bias
    assert torch.allclose(outputs[:, indices], neutral.mean(0)[indices].expand(7, 3))
    untouched = [j for j in range(20) if j not in indices.tolist()]
    assert torch.equal(outputs[:, untouched], (inputs @ weight.T + bias)[:, untouched])
    assert torch.equal(weight, original)  # inputs are not modified


def test_ablation_without_bias_zeroes_rows():
    """SD's to_k/to_v have no bias: the weight edit can only make the neurons output 0."""
    generator = torch.Generator().manual_seed(18)
    weight = _rand(generator, 20, 8, dtype=torch.float16)
    ablation = ablate_neurons(weight, None, torch.tensor([0, 19]), neutral_mean=torch.ones(20))
    assert ablation.mode == "zero" and ablation.bias is None
    assert ablation.weight.dtype == torch.float16
    assert (ablation.weight[[0, 19]] == 0).all()
    assert torch.equal(ablation.weight[1:19], weight[1:19])
    with pytest.raises(ValueError, match="indices"):
        ablate_neurons(weight, None, torch.tensor([20]))


# --------------------------------------------------------------------------------------------
# GPU (runs only where CUDA is present)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(19)
    x_orig, x_target = _rand(generator, 30, 64), _rand(generator, 30, 64)
    weights = _layers(generator, 64, dtype=torch.float16)
    cpu = solve_ridge(build_problem(x_orig, x_target, LAM), weights)
    gpu = solve_ridge(
        build_problem(x_orig.cuda(), x_target.cuda(), LAM), {k: v.cuda() for k, v in weights.items()}
    )
    for name in weights:
        assert gpu.new_weights[name].is_cuda and gpu.new_weights[name].dtype == torch.float16
        difference = (gpu.new_weights[name].cpu().float() - cpu.new_weights[name].float()).abs().max()
        assert difference <= 1e-3


@pytest.mark.parametrize("rows", [5, 20, 31])
def test_low_rank_and_dense_paths_agree(rows):
    generator = torch.Generator().manual_seed(20 + rows)
    x_orig, x_target, kept = _rand(generator, rows, 64), _rand(generator, rows, 64), _rand(generator, 9, 64)
    weights = _layers(generator, 64)
    problem = build_problem(x_orig, x_target, LAM, preserve=kept, row_weights=torch.linspace(0.5, 2, rows))
    assert problem.has_row_factors
    dense = solve_ridge(problem, weights, path="dense")
    low_rank = solve_ridge(problem, weights, path="low-rank")
    auto = solve_ridge(problem, weights)
    assert (dense.path, low_rank.path) == ("dense", "low-rank")
    assert auto.path == ("low-rank" if 2 * rows < 64 else "dense")
    for name in weights:
        assert torch.allclose(dense.new_weights[name], low_rank.new_weights[name], rtol=0, atol=1e-10)
    # many rows: no factors kept, dense only
    big = build_problem(_rand(generator, 70, 64), _rand(generator, 70, 64), LAM)
    assert not big.has_row_factors and solve_ridge(big, weights).path == "dense"
    with pytest.raises(ValueError, match="low-rank"):
        solve_ridge(big, weights, path="low-rank")


def test_bench_script_runs_small(tmp_path, capsys):
    """bench/solve_scaling.py stays runnable (tiny sizes here; the real run is d = 768)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "solve_scaling.py"
    spec = importlib.util.spec_from_file_location("solve_scaling", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "solve_scaling.json"
    report = module.main(["--dim", "32", "--concepts", "1,3", "--rows-per-concept", "4", "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"][0]["concepts"] == 1 and len(saved["results"]) == 2
    assert all(entry["max_abs_difference_float64"] < 1e-9 for entry in report["results"])
    assert all(entry["per_layer_equals_batched"] for entry in report["results"])
    assert "naive/shared" in capsys.readouterr().out


def test_constrained_solve_holds_exactly_and_matches_a_projected_lstsq():
    """SPEED-style equality constraints: rows in the held span keep their outputs to rounding,
    and the rest is the weighted ridge minimiser over the free directions (checked against
    numpy's least squares on the reduced problem)."""
    g = torch.Generator().manual_seed(3)
    d, n, d_out = 12, 40, 7
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    keep = torch.randn(3, d, generator=g, dtype=torch.float64)
    old = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    problem = solve.build_problem(x, y, lam=0.01, preserve=torch.randn(5, d, generator=g, dtype=torch.float64))
    held = solve.held_basis([keep])
    assert held.shape == (d, 3)
    new = solve.solve_ridge_constrained(problem, {"w": old}, held).new_weights["w"]
    free_result = solve.solve_ridge(problem, {"w": old}).new_weights["w"]
    # held rows: unchanged (the unconstrained solve moves them)
    assert torch.allclose(keep @ new.T, keep @ old.T, atol=1e-10)
    assert not torch.allclose(keep @ free_result.T, keep @ old.T, atol=1e-3)
    # the rest: ΔWᵀ = N Z with Z minimising ‖X N Z − R Ŵᵀ‖² + ‖P N Z‖² + λ‖Z‖²
    values, vectors = torch.linalg.eigh(torch.eye(d, dtype=torch.float64) - held @ held.T)
    free = vectors[:, values > 0.5]
    z = torch.linalg.solve(free.T @ problem.normal_matrix() @ free, free.T @ problem.shift @ old.T)
    assert torch.allclose(new, old + (free @ z).T, atol=1e-9)
    # holding nothing is the weighted ridge
    nothing = solve.solve_ridge_constrained(problem, {"w": old}, held[:, :0]).new_weights["w"]
    assert torch.allclose(nothing, free_result, atol=1e-9)
    with pytest.raises(ValueError):
        solve.solve_ridge_constrained(problem, {"w": old}, torch.eye(d, dtype=torch.float64))


def test_leading_directions_take_the_fewest_that_hold_the_share():
    gram = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.0], dtype=torch.float64))
    assert solve.leading_directions(gram, 0.6, 4).shape[1] == 1
    assert solve.leading_directions(gram, 0.9, 4).shape[1] == 2
    assert solve.leading_directions(gram, 0.99, 1).shape[1] == 1
