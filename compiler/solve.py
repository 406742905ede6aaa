"""Closed-form weight edits: LocoEdit, Diff-QuickFix and neuron ablation, in pure torch.

Nothing here knows about models. Callers hand in rows of embeddings (or keys and values) and
the old weights as torch ``Linear.weight`` tensors (shape ``d_out × d``, a layer computes
``y = x Wᵀ``); they get new weights back in each input's own dtype and device.

LocoEdit (Basu et al., ICML 2024, eq. 3; preservation rows as in UCE)
--------------------------------------------------------------------
For one context dimension ``d`` with rows ``X_orig`` (N × d, embeddings of prompts with the
concept), ``X_target`` (N × d, embeddings of the replacement's prompts) and optional
preservation rows ``P`` (M × d, weight ``w``), each layer's new weight minimises::

    ‖X_orig Wᵀ − X_target Ŵᵀ‖² + λ‖W − Ŵ‖² + w‖P Wᵀ − P Ŵᵀ‖²

Setting the gradient to zero (torch layout, W is d_out × d)::

    W (X_origᵀX_orig + w PᵀP + λI) = Ŵ (X_targetᵀX_orig + w PᵀP + λI)

which is the paper's ``W = (XᵀX + λI)⁻¹(XᵀX_target Ŵ + λŴ)`` transposed. With
``A = gram + λI``, ``gram = X_origᵀX_orig + w PᵀP`` and
``shift = X_origᵀ(X_target − X_orig)`` this is the update form that is solved here::

    W = Ŵ + Ŵ Dᵀ,   D = A⁻¹ shift   (d × d, the same for every layer)

So one Cholesky factorisation of ``A`` (float64) and one triangular solve serve every layer
and both K and V. Two association orders give the same W; :func:`solve_ridge` picks the
cheaper one per problem (``path="auto"``):

- ``dense`` (many rows, ``2N ≥ d``): ``D = A⁻¹ shift`` with ``d`` right-hand sides, then one
  ``(d_out × d) @ (d × d)`` product per layer — never ``X_origᵀ(X_target Ŵᵀ)`` per layer,
  which costs N/d times more;
- ``low-rank`` (few rows, ``2N < d``, e.g. one concept on SD's d = 768): ``shift`` is
  ``X_origᵀ R`` with ``R = X_target − X_orig``, so ``U = A⁻¹ X_origᵀ`` (N right-hand sides)
  and ``ΔW = (Ŵ Rᵀ) Uᵀ`` per layer, ``2N/d`` of the dense cost.

(Stacking all layers' ``(cross + λI)Ŵᵀ`` as right-hand sides of the one factorisation gives
the same W with an extra ``d × d × Σd_out`` product and ``Σd_out`` triangular-solve columns;
``bench/solve_scaling.py`` measures all of them.) Preservation rows enter ``gram`` only: they
ask for ``P Wᵀ = P Ŵᵀ``, whose part of ``shift`` is zero.

Diff-QuickFix (Basu et al., ICLR 2024, eq. 4)
--------------------------------------------
For the text encoder's layer-0 self-attention ``out_proj`` with keys ``K`` (N × d_in, its
inputs at the last subject token and optionally EOS), values ``V`` (N × d_out, what the
unedited model gives for the replacement) and preservation keys ``P`` that keep ``Ŵ p``::

    W = (λŴ + Σ v kᵀ + w Σ Ŵ p pᵀ)(λI + Σ k kᵀ + w Σ p pᵀ)⁻¹
      = Ŵ + (V − K Ŵᵀ)ᵀ K A⁻¹,   A = KᵀK + w PᵀP + λI

Same machinery: one Cholesky factorisation of ``A``. At the ``v_proj`` site
(:func:`solve_value_heads`) each head is such a regression, with keys ``Σ_j a_hij x_j`` (the
inputs mixed by that head's attention) and values ``Ŵ_h k'`` (the replacement's mixed inputs).

Many concepts are just more rows: all edits of a recipe are concatenated (or their
:class:`RidgeProblem` summed with :func:`combine_problems`) into one solve per context
dimension, so a 100-concept recipe is one factorisation.

Numerical rules: all arithmetic is float64 on the device the problem lives on (the GPU when
the caller put the rows there); NaN/Inf inputs are refused with :class:`NonFiniteInputError`;
results are cast back to each weight's dtype (fp16/bf16 included); the same inputs give
bit-identical outputs (no randomness, no atomics, a fixed order of operations), whatever the
number of CPU threads: a multi-threaded BLAS splits the long reductions of the Gram products
(``XᵀX`` over tens of thousands of rows) across threads, which changes the order of the
float64 sums (measured on the toy world: Gram matrices 3e-11 apart with 1 vs 2 threads, edited
fp32 weights 1 ulp apart), so every public solver runs its CPU arithmetic on one thread
(:func:`_fixed_order`); the prompt embeddings feeding it were measured identical.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from compiler.device import synchronize as _synchronize
from compiler.errors import UserError

from compiler.defaults import DEFAULT_LAMBDA  # noqa: E402 (λ of both papers, defined once)


def _fixed_order(function):
    """Run ``function`` with one intra-op CPU thread, so that its float64 reductions are
    summed in the same order on every machine setting (see the module docstring)."""
    import functools

    @functools.wraps(function)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return function(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


class NonFiniteInputError(UserError):
    """An input of a solve holds NaN or Inf (a corrupt checkpoint or a broken embedding)."""


class SolveError(UserError, RuntimeError):
    """The normal matrix could not be factorised (it is not positive definite). It follows
    from the recipe's λ and rows, so it is reported like bad input: one line, exit 2."""


# --------------------------------------------------------------------------------------------
# Problems and the shared factorisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class RidgeProblem:
    """The statistics of one LocoEdit regression for one context dimension ``d``.

    - ``gram``: ``X_origᵀ diag(r) X_orig + w PᵀP`` (d × d, float64), without λ.
    - ``shift``: ``X_origᵀ diag(r) (X_target − X_orig)`` (d × d, float64).
    - ``lam``: λ; the factorised matrix is ``gram + λI``.
    - ``n_rows`` / ``n_preserve_rows``: how many edit and preservation rows went in.
    - ``edit_rows`` / ``edit_residuals``: the factors of ``shift`` (``diag(r) X_orig`` and
      ``X_target − X_orig``, N × d float64), kept when ``N < d`` so that the solve can use the
      low-rank path; ``None`` otherwise.

    ``r`` are optional per-row weights (1 by default). :attr:`cross` is the paper's
    ``X_origᵀX_target`` term (plus preservation), ``gram + shift``.
    """

    gram: Tensor
    shift: Tensor
    lam: float
    n_rows: int
    n_preserve_rows: int = 0
    edit_rows: Tensor | None = None
    edit_residuals: Tensor | None = None

    @property
    def dim(self) -> int:
        return self.gram.shape[0]

    @property
    def device(self) -> torch.device:
        return self.gram.device

    @property
    def cross(self) -> Tensor:
        """``X_origᵀX_target + w PᵀP``: the right-hand side factor ``(cross + λI)Ŵᵀ``."""
        return self.gram + self.shift

    def normal_matrix(self) -> Tensor:
        """``gram + λI``, the symmetric positive definite matrix that gets factorised."""
        return _add_ridge(self.gram, self.lam)

    @property
    def has_row_factors(self) -> bool:
        return self.edit_rows is not None and self.edit_residuals is not None

    def to(self, device: torch.device | str) -> RidgeProblem:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device)

        return RidgeProblem(
            self.gram.to(device),
            self.shift.to(device),
            self.lam,
            self.n_rows,
            self.n_preserve_rows,
            move(self.edit_rows),
            move(self.edit_residuals),
        )


@dataclass(frozen=True, eq=False)
class PreservationGram:
    """``PᵀP`` of preservation rows (d × d float64; H × d × d for per-head keys) and how many
    rows made it. It does not depend on the edits, so ``compiler.preserve_cache`` keeps it on
    disk; a solve given it adds exactly what it would have computed from the rows."""

    gram: Tensor
    n_rows: int


@_fixed_order
def preservation_gram(rows: Tensor) -> PreservationGram:
    """``PᵀP`` of M × d rows (or, per head, of H × M × d rows), float64, exactly as a solve
    forms it from the rows themselves."""
    if rows.ndim == 3:
        grams = [preservation_gram(head).gram for head in rows]
        return PreservationGram(torch.stack(grams), rows.shape[1])
    kept = _as_rows("preserve", rows).to(dtype=torch.float64)
    return PreservationGram(_symmetric(kept.T @ kept), kept.shape[0])


def _preserve_term(preserve, dim: int, device, what: str) -> tuple[Tensor, int]:
    """(``PᵀP``, rows) of preservation rows or of a :class:`PreservationGram`."""
    if not isinstance(preserve, PreservationGram):
        preserve = preservation_gram(torch.as_tensor(preserve).to(device=device))
    gram = preserve.gram.to(device=device, dtype=torch.float64)
    if gram.shape != (dim, dim):
        raise ValueError(f"{what} rows have width {gram.shape[-1]}, edit rows {dim}; they must "
                         "share the context dimension")
    return gram, preserve.n_rows


@_fixed_order
def build_problem(
    x_orig: Tensor,
    x_target: Tensor,
    lam: float = DEFAULT_LAMBDA,
    preserve: Tensor | PreservationGram | None = None,
    preserve_weight: float = 1.0,
    row_weights: Tensor | float | None = None,
) -> RidgeProblem:
    """Form the d × d statistics of a LocoEdit regression (once; every layer reuses them).

    ``x_orig`` and ``x_target`` are N × d rows (prompt embeddings with the concept, and of the
    target prompts); ``preserve`` is M × d rows that should keep their old outputs, weighted
    by ``preserve_weight``; ``row_weights`` (scalar or N) weights the edit rows — e.g.
    ``λ_recipe / λ_edit`` gives an edit its own λ inside a joint solve. Computed in float64
    on ``x_orig``'s device.
    """
    _require_positive("lam", lam)
    _require_positive("preserve_weight", preserve_weight)
    x_orig = _as_rows("x_orig", x_orig)
    x_target = _as_rows("x_target", x_target)
    if x_orig.shape != x_target.shape:
        raise ValueError(
            f"x_orig {tuple(x_orig.shape)} and x_target {tuple(x_target.shape)} must have the "
            "same shape: one target row per concept row"
        )
    device = x_orig.device
    rows = x_orig.to(device=device, dtype=torch.float64)
    targets = x_target.to(device=device, dtype=torch.float64)
    weighted_rows = rows
    if row_weights is not None:
        weights = torch.as_tensor(row_weights, dtype=torch.float64, device=device)
        _require_finite("row_weights", weights)
        if bool((weights <= 0).any()):
            raise ValueError("row_weights must be > 0")
        weighted_rows = rows * (weights.reshape(-1, 1) if weights.ndim else weights)
    # Form d × d statistics once (never X_origᵀ(X_target Ŵᵀ) per layer: N/d times dearer).
    residuals = targets - rows
    gram = _symmetric(weighted_rows.T @ rows)
    shift = weighted_rows.T @ residuals
    keep_factors = rows.shape[0] < rows.shape[1]
    n_preserve = 0
    if preserve is not None:
        preserve_gram, n_preserve = _preserve_term(preserve, rows.shape[1], device, "preserve")
        gram = gram + preserve_weight * preserve_gram
    return RidgeProblem(
        gram,
        shift,
        float(lam),
        rows.shape[0],
        n_preserve,
        weighted_rows.contiguous() if keep_factors else None,
        residuals if keep_factors else None,
    )


@_fixed_order
def combine_problems(problems: Sequence[RidgeProblem]) -> RidgeProblem:
    """Sum the statistics of several problems (same d, same λ): the rows of all edits in one
    regression. Equal to :func:`build_problem` on the concatenated rows."""
    if not problems:
        raise ValueError("combine_problems needs at least one problem")
    first = problems[0]
    for other in problems[1:]:
        if other.dim != first.dim:
            raise ValueError(f"cannot combine context dimensions {first.dim} and {other.dim}")
        if other.lam != first.lam:
            raise ValueError(
                f"cannot combine λ={first.lam} and λ={other.lam}; give edits their own λ "
                "through row_weights instead"
            )
    gram = first.gram.clone()
    shift = first.shift.clone()
    for other in problems[1:]:
        gram += other.gram.to(gram.device)
        shift += other.shift.to(shift.device)
    n_rows = sum(p.n_rows for p in problems)
    edit_rows = edit_residuals = None
    if n_rows < first.dim and all(p.has_row_factors for p in problems):
        edit_rows = torch.cat([p.edit_rows.to(gram.device) for p in problems])
        edit_residuals = torch.cat([p.edit_residuals.to(gram.device) for p in problems])
    return RidgeProblem(
        gram,
        shift,
        first.lam,
        n_rows,
        sum(p.n_preserve_rows for p in problems),
        edit_rows,
        edit_residuals,
    )


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class Factorization:
    """The Cholesky factor ``L`` of a symmetric positive definite ``A = L Lᵀ`` (float64).

    ``condition_number`` is the 2-norm condition number of ``A``: exact
    (``λ_max / λ_min`` from ``eigvalsh``) or, with ``condition="estimate"``, a power-iteration
    estimate that costs O(d²) per step instead of O(d³) (it can only under-estimate).
    """

    cholesky: Tensor
    condition_number: float
    seconds: float

    def solve(self, rhs: Tensor) -> Tensor:
        """``A⁻¹ rhs`` by two triangular solves (never an explicit inverse)."""
        return torch.cholesky_solve(rhs, self.cholesky)


@_fixed_order
def factorize(matrix: Tensor, condition: str = "exact") -> Factorization:
    """Cholesky-factorise a symmetric positive definite float64 matrix."""
    if condition not in ("exact", "estimate", "none"):
        raise ValueError("condition must be 'exact', 'estimate' or 'none'")
    _require_finite("the normal matrix", matrix)
    start = time.perf_counter()
    matrix = matrix.to(torch.float64)
    cholesky, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise SolveError(
            f"the normal matrix (d={matrix.shape[0]}) is not positive definite at column "
            f"{int(info)}; raise lambda (the recipe's or the edit's), or give fewer, less similar prompts"
        )
    if condition == "exact":
        eigenvalues = torch.linalg.eigvalsh(matrix)
        condition_number = float(eigenvalues[-1] / eigenvalues[0])
    elif condition == "estimate":
        condition_number = _estimate_condition(matrix, cholesky)
    else:
        condition_number = float("nan")
    _synchronize(matrix.device)
    return Factorization(cholesky, condition_number, time.perf_counter() - start)


def _estimate_condition(matrix: Tensor, cholesky: Tensor, iterations: int = 30) -> float:
    """``‖A‖₂ ‖A⁻¹‖₂`` by power iteration on A and on A⁻¹ (via the Cholesky factor); a fixed
    start vector keeps it deterministic."""
    dim = matrix.shape[0]
    start = torch.ones(dim, 1, dtype=matrix.dtype, device=matrix.device)
    start[::2] = -0.5  # not orthogonal to the usual top eigenvector of a Gram matrix

    def top_eigenvalue(apply) -> float:
        vector = start / start.norm()
        value = 0.0
        for _ in range(iterations):
            image = apply(vector)
            value = float((vector * image).sum())
            vector = image / image.norm()
        return value

    largest = top_eigenvalue(lambda v: matrix @ v)
    inverse_largest = top_eigenvalue(lambda v: torch.cholesky_solve(v, cholesky))
    return largest * inverse_largest


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class SolveResult:
    """New weights (each in its input's dtype and device), the condition number of the
    factorised matrix (NaN when not computed), wall times in seconds (``seconds`` = the whole
    call, ``timings`` = its stages), and for LocoEdit which association ``path`` ran."""

    new_weights: dict[str, Tensor]
    condition_number: float
    seconds: float
    lam: float = DEFAULT_LAMBDA
    n_rows: int = 0
    n_preserve_rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    path: str = ""


# --------------------------------------------------------------------------------------------
# LocoEdit
# --------------------------------------------------------------------------------------------


@_fixed_order
def solve_ridge(
    problem: RidgeProblem,
    old_weights: Mapping[str, Tensor],
    *,
    condition: str = "exact",
    path: str = "auto",
) -> SolveResult:
    """LocoEdit for every weight in ``old_weights`` (name → d_out × d Linear weight), all
    sharing ``problem``'s context dimension: one factorisation and one triangular solve for all
    of them, then one product per weight (see the module docstring).

    ``path``: ``"auto"`` (low-rank when the problem kept its row factors and ``2N < d``, else
    dense), ``"dense"`` or ``"low-rank"``. ``condition``: ``"exact"``, ``"estimate"`` or
    ``"none"`` (see :func:`factorize`). Computed in float64 on the problem's device; each result
    is returned in its input's dtype and on its device."""
    start = time.perf_counter()
    _check_problem(problem)
    _check_weights(old_weights, problem.dim, "context dimension")
    if path not in ("auto", "dense", "low-rank"):
        raise ValueError("path must be 'auto', 'dense' or 'low-rank'")
    if path == "low-rank" and not problem.has_row_factors:
        raise ValueError("the low-rank path needs a problem built with fewer rows than d")
    low_rank = path == "low-rank" or (
        path == "auto" and problem.has_row_factors and 2 * problem.n_rows < problem.dim
    )
    factorization = factorize(problem.normal_matrix(), condition=condition)
    if low_rank:
        # U = A⁻¹ X_origᵀ: N right-hand sides; ΔW = (Ŵ Rᵀ) Uᵀ with R = X_target − X_orig.
        solved_rows_t = factorization.solve(problem.edit_rows.T.contiguous()).T.contiguous()
        residuals_t = problem.edit_residuals.T.contiguous()
    else:
        # D = A⁻¹ X_origᵀ(X_target − X_orig): d right-hand sides for all layers.
        transfer_t = factorization.solve(problem.shift).T.contiguous()
    solved_at = time.perf_counter()
    new_weights = {}
    for name, old in old_weights.items():
        old64 = old.detach().to(device=problem.device, dtype=torch.float64)
        # W = Ŵ + Ŵ Dᵀ  ⇔  W(gram + λI) = Ŵ(crossᵀ + λI)   (ICML 2024, eq. 3, transposed)
        if low_rank:
            new64 = old64 + (old64 @ residuals_t) @ solved_rows_t
        else:
            new64 = old64 + old64 @ transfer_t
        new_weights[name] = new64.to(device=old.device, dtype=old.dtype)
    _synchronize(problem.device)
    end = time.perf_counter()
    return SolveResult(
        new_weights=new_weights,
        condition_number=factorization.condition_number,
        seconds=end - start,
        lam=problem.lam,
        n_rows=problem.n_rows,
        n_preserve_rows=problem.n_preserve_rows,
        timings={
            "factorize": factorization.seconds,
            "transfer": solved_at - start - factorization.seconds,
            "apply": end - solved_at,
        },
        path="low-rank" if low_rank else "dense",
    )


def add_preservation(problem: RidgeProblem, preserve, preserve_weight: float = 1.0) -> RidgeProblem:
    """``problem`` with preservation rows (or a :class:`PreservationGram`) added to its Gram:
    exactly what :func:`build_problem` given ``preserve`` forms (the same sum, in that order)."""
    gram, n_preserve = _preserve_term(preserve, problem.dim, problem.device, "preserve")
    return RidgeProblem(problem.gram + preserve_weight * gram, problem.shift, problem.lam, problem.n_rows,
                        problem.n_preserve_rows + n_preserve, problem.edit_rows, problem.edit_residuals)


def held_basis(states: Sequence[Tensor], tolerance: float = 1e-9) -> Tensor:
    """An orthonormal basis (d × h, float64) of the span of the given rows (each M × d): the
    directions a constrained solve keeps exactly. Directions whose singular value is below
    ``tolerance`` × the largest are numerically not there and are left out."""
    rows = torch.cat([torch.as_tensor(s).to(torch.float64).reshape(-1, torch.as_tensor(s).shape[-1]) for s in states])
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)
    keep = singular > tolerance * singular[0]
    return vh[keep].T.contiguous()


def leading_directions(gram: Tensor, share: float, at_most: int) -> Tensor:
    """The leading eigenvectors (d × r, float64) of a symmetric positive semi-definite Gram
    matrix: the fewest that hold ``share`` of its trace, at most ``at_most`` of them."""
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    total = float(values.sum())
    if total <= 0 or at_most <= 0:
        return vectors[:, :0]
    cumulative = torch.cumsum(values, 0) / total
    count = int((cumulative < share).sum()) + 1
    return vectors[:, : min(count, at_most)].contiguous()


@_fixed_order
def solve_ridge_constrained(
    problem: RidgeProblem,
    old_weights: Mapping[str, Tensor],
    held: Tensor,
    *,
    condition: str = "exact",
) -> SolveResult:
    """LocoEdit with equality constraints (SPEED, Li et al. 2025; AlphaEdit's null-space
    projection): every context row in the span of ``held`` (d × h, orthonormal columns) keeps
    its K and V *exactly* in every layer; the weighted ridge objective of ``problem`` is
    minimised over what is left. With ``N`` an orthonormal basis of the complement of
    ``held``, the update of every layer is ``W = Ŵ + Ŵ Dᵀ`` with::

        D = N (Nᵀ A N)⁻¹ Nᵀ shift,   A = gram + λI

    (the unconstrained solve is the case h = 0, N = I): for a held row x, ``x D = 0``, so
    ``x Wᵀ = x Ŵᵀ``. One factorisation of the (d − h)-square ``NᵀAN`` serves every layer and
    both K and V."""
    start = time.perf_counter()
    _check_problem(problem)
    _check_weights(old_weights, problem.dim, "context dimension")
    device = problem.device
    held = held.to(device=device, dtype=torch.float64)
    if held.ndim != 2 or held.shape[0] != problem.dim:
        raise ValueError(f"held must be d × h with d = {problem.dim}, got {tuple(held.shape)}")
    if held.shape[1] >= problem.dim:
        raise ValueError(f"held spans all {problem.dim} dimensions: nothing is left to edit")
    projector = torch.eye(problem.dim, dtype=torch.float64, device=device) - held @ held.T
    values, vectors = torch.linalg.eigh(_symmetric(projector))
    free = vectors[:, values > 0.5].contiguous()  # the complement: eigenvalue 1 of the projector
    reduced = _symmetric(free.T @ problem.normal_matrix() @ free)
    factorization = factorize(reduced, condition=condition)
    transfer_t = (free @ factorization.solve(free.T @ problem.shift)).T.contiguous()
    solved_at = time.perf_counter()
    new_weights = {}
    for name, old in old_weights.items():
        old64 = old.detach().to(device=device, dtype=torch.float64)
        new_weights[name] = (old64 + old64 @ transfer_t).to(device=old.device, dtype=old.dtype)
    _synchronize(device)
    end = time.perf_counter()
    return SolveResult(
        new_weights=new_weights, condition_number=factorization.condition_number, seconds=end - start,
        lam=problem.lam, n_rows=problem.n_rows, n_preserve_rows=problem.n_preserve_rows,
        timings={"factorize": factorization.seconds, "transfer": solved_at - start - factorization.seconds,
                 "apply": end - solved_at},
        path=f"constrained ({held.shape[1]} held)",
    )


@_fixed_order
def solve_ridge_stacked(problem: RidgeProblem, old_weights: Mapping[str, Tensor]) -> SolveResult:
    """The same solution with every layer's right-hand side ``(cross + λI) Ŵᵀ`` stacked into
    one Cholesky solve (the textbook batched form). Slower than :func:`solve_ridge`; kept so
    the benchmark and the tests can compare the two."""
    start = time.perf_counter()
    _check_problem(problem)
    _check_weights(old_weights, problem.dim, "context dimension")
    factorization = factorize(problem.normal_matrix(), condition="none")
    cross_plus_ridge = _add_ridge(problem.cross, problem.lam)
    olds = [w.detach().to(device=problem.device, dtype=torch.float64) for w in old_weights.values()]
    rhs = torch.cat([cross_plus_ridge @ old.T for old in olds], dim=1)
    solution = factorization.solve(rhs)  # d × Σ d_out, column blocks are the layers' Wᵀ
    new_weights = {}
    offset = 0
    for (name, old), old64 in zip(old_weights.items(), olds):
        rows = old64.shape[0]
        new_weights[name] = solution[:, offset : offset + rows].T.to(device=old.device, dtype=old.dtype)
        offset += rows
    _synchronize(problem.device)
    return SolveResult(new_weights, factorization.condition_number, time.perf_counter() - start,
                       problem.lam, problem.n_rows, problem.n_preserve_rows)


@_fixed_order
def solve_ridge_unshared(problem: RidgeProblem, old_weights: Mapping[str, Tensor]) -> SolveResult:
    """The naive way, for reference only: one ``torch.linalg.solve`` (LU) per layer, with the
    right-hand side formed per layer. What the shared factorisation avoids."""
    start = time.perf_counter()
    _check_problem(problem)
    normal = problem.normal_matrix()
    cross_plus_ridge = _add_ridge(problem.cross, problem.lam)
    new_weights = {}
    for name, old in old_weights.items():
        old64 = old.detach().to(device=problem.device, dtype=torch.float64)
        new_t = torch.linalg.solve(normal, cross_plus_ridge @ old64.T)
        new_weights[name] = new_t.T.to(device=old.device, dtype=old.dtype)
    _synchronize(problem.device)
    return SolveResult(new_weights, float("nan"), time.perf_counter() - start,
                       problem.lam, problem.n_rows, problem.n_preserve_rows)


# --------------------------------------------------------------------------------------------
# Diff-QuickFix
# --------------------------------------------------------------------------------------------


@_fixed_order
def solve_quickfix(
    keys: Tensor,
    values: Tensor,
    old_weight: Tensor,
    lam: float = DEFAULT_LAMBDA,
    preserve_keys: Tensor | PreservationGram | None = None,
    preserve_weight: float = 1.0,
    *,
    name: str = "out_proj",
    row_weights: Tensor | None = None,
    condition: str = "exact",
) -> SolveResult:
    """Diff-QuickFix (ICLR 2024, eq. 4): ``W = (λŴ + Σ v kᵀ + w Σ Ŵ p pᵀ)(λI + Σ k kᵀ + w Σ p pᵀ)⁻¹``.

    ``keys``: N × d_in inputs of the layer at the concept's last subject token (and EOS);
    ``values``: N × d_out outputs it should now produce (the unedited layer's outputs for the
    replacement prompts); ``old_weight``: d_out × d_in; ``preserve_keys``: M × d_in inputs
    whose outputs ``Ŵ p`` must stay. Returns ``new_weights[name]``.
    """
    return solve_values(
        keys,
        {name: values},
        {name: old_weight},
        lam=lam,
        preserve_keys=preserve_keys,
        preserve_weight=preserve_weight,
        row_weights=row_weights,
        condition=condition,
    )


@_fixed_order
def solve_value_heads(
    keys: Tensor,
    target_keys: Tensor,
    old_weight: Tensor,
    lam: float = DEFAULT_LAMBDA,
    preserve_keys: Tensor | PreservationGram | None = None,
    *,
    name: str = "v_proj",
    row_weights: Tensor | None = None,
    condition: str = "exact",
) -> SolveResult:
    """Diff-QuickFix at the layer-0 attention's ``v_proj``: one ridge regression per head.

    ``keys`` / ``target_keys``: H × N × d attention-mixed inputs (see
    ``compiler.encode.PromptEncoder.value_keys``) of the concept's and the replacement's prompts;
    ``preserve_keys``: H × M × d. Head h owns rows ``h·d_h … (h+1)·d_h`` of ``old_weight``
    (H·d_h × d) and gets ``W_h k = Ŵ_h k'`` for each concept key k and its target key k' —
    eq. 4 with ``V = K' Ŵ_hᵀ`` — so the head emits at the concept's token what it emitted
    at the replacement's. Heads read different keys, so there are H factorisations (d × d
    each). The reported condition number is the largest.
    """
    start = time.perf_counter()
    keys = torch.as_tensor(keys)
    if keys.ndim != 3 or target_keys.shape != keys.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and target_keys {tuple(target_keys.shape)} "
                         "must both be H × N × d")
    heads = keys.shape[0]
    if old_weight.shape[0] % heads:
        raise ValueError(f"{name}: {old_weight.shape[0]} output rows do not split into {heads} heads")
    rows = old_weight.shape[0] // heads
    parts, conditions, n_preserve = [], [], 0
    for h in range(heads):
        old_h = old_weight[h * rows : (h + 1) * rows]
        values = target_keys[h].to(torch.float64) @ old_h.detach().to(device=target_keys.device, dtype=torch.float64).T
        result = solve_values(keys[h], {name: values}, {name: old_h}, lam=lam,
                              preserve_keys=None if preserve_keys is None else _head(preserve_keys, h),
                              row_weights=row_weights, condition=condition)
        parts.append(result.new_weights[name])
        conditions.append(result.condition_number)
        n_preserve = result.n_preserve_rows
    return SolveResult(
        new_weights={name: torch.cat(parts)},
        condition_number=max(conditions),
        seconds=time.perf_counter() - start,
        lam=float(lam),
        n_rows=keys.shape[1],
        n_preserve_rows=n_preserve,
    )


def _head(preserve, h: int):
    if isinstance(preserve, PreservationGram):
        return PreservationGram(preserve.gram[h], preserve.n_rows)
    return preserve[h]


@_fixed_order
def solve_values(
    keys: Tensor,
    values: Mapping[str, Tensor],
    old_weights: Mapping[str, Tensor],
    lam: float = DEFAULT_LAMBDA,
    preserve_keys: Tensor | PreservationGram | None = None,
    preserve_weight: float = 1.0,
    *,
    row_weights: Tensor | None = None,
    condition: str = "exact",
) -> SolveResult:
    """Ridge regressions with explicit target values for several weights that read the same
    ``keys`` (one factorisation of ``Kᵀ diag(r) K + w PᵀP + λI`` for all of them)::

        W = Ŵ + (V − K Ŵᵀ)ᵀ diag(r) K A⁻¹

    ``row_weights`` r (N, default 1) weight the key rows, e.g. ``λ_recipe / λ_edit`` gives an
    edit its own λ in a joint solve. LocoEdit is the special case ``V = X_target Ŵᵀ``;
    Diff-QuickFix is one weight."""
    start = time.perf_counter()
    _require_positive("lam", lam)
    _require_positive("preserve_weight", preserve_weight)
    if set(values) != set(old_weights):
        raise ValueError(f"values {sorted(values)} and old_weights {sorted(old_weights)} differ")
    keys = _as_rows("keys", keys)
    device = keys.device
    keys64 = keys.to(dtype=torch.float64)
    dim = keys64.shape[1]
    _check_weights(old_weights, dim, "key dimension")
    weighted = keys64
    if row_weights is not None:
        weights = torch.as_tensor(row_weights, dtype=torch.float64, device=device).reshape(-1)
        _require_finite("row_weights", weights)
        if weights.shape[0] != keys64.shape[0] or bool((weights <= 0).any()):
            raise ValueError(f"row_weights must be {keys64.shape[0]} positive numbers, one per key")
        weighted = keys64 * weights.reshape(-1, 1)
    normal = _symmetric(weighted.T @ keys64)
    n_preserve = 0
    if preserve_keys is not None:
        preserve_gram, n_preserve = _preserve_term(preserve_keys, dim, device, "preserve_keys")
        normal = normal + preserve_weight * preserve_gram
    factorization = factorize(_add_ridge(normal, lam), condition=condition)
    solved_at = time.perf_counter()
    # A⁻¹Kᵀ once (N columns) serves every weight when N is small; else solve Kᵀ R per weight.
    keys_solved = factorization.solve(weighted.T.contiguous()) if keys64.shape[0] <= dim else None
    new_weights = {}
    for name, old in old_weights.items():
        target = _as_rows(f"values[{name!r}]", values[name]).to(device=device, dtype=torch.float64)
        if target.shape != (keys64.shape[0], old.shape[0]):
            raise ValueError(
                f"values[{name!r}] has shape {tuple(target.shape)}, expected "
                f"({keys64.shape[0]}, {old.shape[0]}): one output row per key"
            )
        old64 = old.detach().to(device=device, dtype=torch.float64)
        residual = target - keys64 @ old64.T  # V − K Ŵᵀ, N × d_out
        if keys_solved is not None:
            delta_t = keys_solved @ residual
        else:
            delta_t = factorization.solve(weighted.T @ residual)
        new_weights[name] = (old64 + delta_t.T).to(device=old.device, dtype=old.dtype)
    _synchronize(device)
    end = time.perf_counter()
    return SolveResult(
        new_weights=new_weights,
        condition_number=factorization.condition_number,
        seconds=end - start,
        lam=float(lam),
        n_rows=keys64.shape[0],
        n_preserve_rows=n_preserve,
        timings={"factorize": factorization.seconds, "apply": end - solved_at},
    )


# --------------------------------------------------------------------------------------------
# Neuron-level ablation (ICML 2024, Sec. "neuron-level model editing")
# --------------------------------------------------------------------------------------------


@_fixed_order
def neuron_zscores(acts_with: Tensor, acts_without: Tensor, eps: float = 1e-12) -> Tensor:
    """Two-sample z statistic per output neuron (float64, length d_out)::

        z_j = (mean_with_j − mean_without_j) / sqrt(var_with_j / N1 + var_without_j / N2 + eps)

    ``acts_with`` (N1 × d_out): the layer's outputs (e.g. ``to_k``/``to_v``) for prompts with
    the concept; ``acts_without`` (N2 × d_out): for the same prompts without it."""
    with_ = _as_rows("acts_with", acts_with).to(torch.float64)
    without = _as_rows("acts_without", acts_without).to(device=with_.device, dtype=torch.float64)
    if with_.shape[1] != without.shape[1]:
        raise ValueError(f"acts_with has {with_.shape[1]} neurons, acts_without {without.shape[1]}")
    if with_.shape[0] < 2 or without.shape[0] < 2:
        raise ValueError("z-scores need at least two rows in each group")
    difference = with_.mean(0) - without.mean(0)
    spread = with_.var(0) / with_.shape[0] + without.var(0) / without.shape[0]
    return difference / torch.sqrt(spread + eps)


@_fixed_order
def zscore_neurons(acts_with: Tensor, acts_without: Tensor, top_k: int) -> Tensor:
    """Indices (int64, ascending) of the ``top_k`` output neurons with the largest ``|z|``
    (:func:`neuron_zscores`); ties broken by the lower index, so the choice is deterministic."""
    scores = neuron_zscores(acts_with, acts_without).abs()
    if not 1 <= top_k <= scores.numel():
        raise ValueError(f"top_k must be between 1 and {scores.numel()}, got {top_k}")
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:top_k]).values


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class NeuronAblation:
    """The fused result of :func:`ablate_neurons`.

    ``mode`` is ``"mean"`` when the bias let the neurons be pinned to the neutral mean exactly,
    ``"zero"`` when there is no bias and the rows were zeroed (outputs become 0)."""

    weight: Tensor
    bias: Tensor | None
    indices: Tensor
    mode: str


@_fixed_order
def ablate_neurons(
    weight: Tensor,
    bias: Tensor | None,
    indices: Tensor,
    neutral_mean: Tensor | None = None,
) -> NeuronAblation:
    """Fuse "output neurons ``indices`` always output the neutral group's mean" into a Linear.

    What a weight edit can and cannot express. A Linear computes ``y_j = W_j · x + b_j``. An
    output that ignores its input and returns a constant ``m_j`` needs ``W_j = 0`` and
    ``b_j = m_j``:

    - with a bias, that is exact: rows zeroed, ``b_j = m_j`` (``mode="mean"``);
    - without a bias — SD's cross-attention ``to_k``/``to_v`` have none — no weight matrix
      maps every input to a non-zero constant, so the fused edit zeroes the rows and the
      neurons output 0 (``mode="zero"``). Mean ablation then needs a runtime hook (or adding a
      bias tensor, which changes the checkpoint's key set and what loaders expect), so it is
      not done here.

    ``neutral_mean`` holds one value per output neuron (length d_out) or per index (length
    ``len(indices)``); it is required only when ``bias`` is given. Returns new tensors in the
    inputs' dtypes; the inputs are not modified.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (d_out × d_in), got shape {tuple(weight.shape)}")
    _require_finite("weight", weight)
    indices = torch.as_tensor(indices, dtype=torch.long, device=weight.device).reshape(-1)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= weight.shape[0]):
        raise ValueError(f"neuron indices must lie in 0..{weight.shape[0] - 1}")
    new_weight = weight.detach().clone()
    new_weight[indices] = 0
    if bias is None:
        return NeuronAblation(new_weight, None, indices, "zero")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if neutral_mean is None:
        raise ValueError("neutral_mean is required when the layer has a bias")
    means = torch.as_tensor(neutral_mean).to(device=bias.device).reshape(-1)
    _require_finite("neutral_mean", means)
    if means.numel() == weight.shape[0]:
        means = means[indices]
    elif means.numel() != indices.numel():
        raise ValueError(
            f"neutral_mean has {means.numel()} values; give one per output neuron "
            f"({weight.shape[0]}) or one per index ({indices.numel()})"
        )
    new_bias = bias.detach().clone()
    new_bias[indices] = means.to(bias.dtype)
    return NeuronAblation(new_weight, new_bias, indices, "mean")


# --------------------------------------------------------------------------------------------
# Checks and helpers
# --------------------------------------------------------------------------------------------


def _symmetric(matrix: Tensor) -> Tensor:
    """Exactly symmetric, whatever order BLAS summed the two triangles in."""
    return 0.5 * (matrix + matrix.T)


def _add_ridge(matrix: Tensor, lam: float) -> Tensor:
    out = matrix.clone()
    out.diagonal().add_(lam)
    return out


def _require_positive(name: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _require_finite(name: str, tensor: Tensor) -> None:
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteInputError(
                f"{name} holds {bad} NaN/Inf value{'s' if bad != 1 else ''} of "
                f"{tensor.numel()}; the solve needs finite inputs (check the checkpoint and "
                "the embeddings)"
            )


def _as_rows(name: str, tensor: Tensor) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows × features), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    _require_finite(name, tensor)
    return tensor.detach()


def _check_problem(problem: RidgeProblem) -> None:
    _require_positive("lam", problem.lam)
    _require_finite("the problem's gram matrix", problem.gram)
    _require_finite("the problem's shift matrix", problem.shift)


def _check_weights(old_weights: Mapping[str, Tensor], dim: int, what: str) -> None:
    if not old_weights:
        raise ValueError("no weights to solve for")
    for name, weight in old_weights.items():
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise ValueError(f"weight {name!r} must be a 2-D tensor (d_out × d_in)")
        if weight.shape[1] != dim:
            raise ValueError(
                f"weight {name!r} reads {weight.shape[1]} features but the {what} is {dim}"
            )
        _require_finite(f"weight {name!r}", weight)

