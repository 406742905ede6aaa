"""How the closed-form solve scales with the number of concepts, and what sharing buys.

For 1, 10, 50 and 100 concepts (21 random rows each, d = 768 like SD-1.5's CLIP text width)
it solves LocoEdit for all 16 SD-1.5 cross-attention layers × K and V (d_out 320…1280) three
ways, in the same run:

- ``shared``: :func:`compiler.solve.solve_ridge` as compile calls it — one Cholesky
  factorisation, one triangular solve, one product per weight, on the cheaper association
  (``low-rank`` while 2N < d, else ``dense``); ``dense`` forces the d-column path;
- ``stacked``: :func:`compiler.solve.solve_ridge_stacked` — one Cholesky, every layer's
  right-hand side stacked into one triangular solve;
- ``naive``: :func:`compiler.solve.solve_ridge_unshared` — ``torch.linalg.solve`` per weight.

A last line times the typical compile: one concept, one located window of 3 layers × K and V,
with the exact condition number. It prints the median wall times and the ratios naive/shared and stacked/shared, checks that the
three agree, and writes ``bench/results/solve_scaling.json``. Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/solve_scaling.py            # CPU
    .venv/bin/python bench/solve_scaling.py --device cuda                # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compiler.solve import (  # noqa: E402
    build_problem,
    combine_problems,
    factorize,
    solve_ridge,
    solve_ridge_stacked,
    solve_ridge_unshared,
)

# SD-1.5's 16 cross-attention layers in the papers' order (sorted attn2 module names):
# down_blocks.0 (320 ×2), down_blocks.1 (640 ×2), down_blocks.2 (1280 ×2), mid (1280),
# up_blocks.1 (1280 ×3), up_blocks.2 (640 ×3), up_blocks.3 (320 ×3).
SD15_CROSS_ATTENTION_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)


def _time(function, repeats: int, device: torch.device) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", default="1,10,50,100", help="comma-separated concept counts")
    parser.add_argument("--rows-per-concept", type=int, default=21)
    parser.add_argument("--dim", type=int, default=768, help="context dimension d")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "solve_scaling.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    dim = args.dim
    weights = {}
    for index, width in enumerate(SD15_CROSS_ATTENTION_WIDTHS):
        for kind in ("to_k", "to_v"):
            weight = torch.randn(width, dim, generator=generator) / dim**0.5
            weights[f"attn2[{index}].{kind}"] = weight.to(device=device, dtype=dtype)
    total_out = sum(w.shape[0] for w in weights.values())

    # Warm up kernels and lazy initialisation so the first measured size is not penalised.
    warm = build_problem(torch.randn(8, dim, generator=generator).to(device), torch.randn(8, dim, generator=generator).to(device))
    solve_ridge(warm, weights)
    solve_ridge_stacked(warm, weights)
    solve_ridge_unshared(warm, weights)

    print(
        f"device={device} threads={torch.get_num_threads()} d={dim} weights={len(weights)} "
        f"(Σd_out={total_out}, {args.dtype}) rows/concept={args.rows_per_concept} "
        f"repeats={args.repeats} (median)"
    )
    header = (
        f"{'concepts':>8} {'rows':>6} {'build':>7} {'chol':>7} {'cond':>7} {'path':>8} "
        f"{'shared':>7} {'dense':>7} {'stacked':>7} {'naive':>7} {'naive/shared':>12} "
        f"{'stacked/shared':>14} {'max|Δ|':>8}"
    )
    print(header)
    results = []
    for concepts in [int(c) for c in args.concepts.split(",")]:
        rows = concepts * args.rows_per_concept
        x_orig = torch.randn(rows, dim, generator=generator).to(device)
        x_target = torch.randn(rows, dim, generator=generator).to(device)

        def build():
            # every concept contributes its own statistics; the recipe is their sum
            per_concept = [
                build_problem(
                    x_orig[i * args.rows_per_concept : (i + 1) * args.rows_per_concept],
                    x_target[i * args.rows_per_concept : (i + 1) * args.rows_per_concept],
                )
                for i in range(concepts)
            ]
            return combine_problems(per_concept)

        build_s, problem = _time(build, args.repeats, device)
        chol_s, _ = _time(lambda: factorize(problem.normal_matrix(), condition="none"), args.repeats, device)
        with_cond_s, factorization = _time(
            lambda: factorize(problem.normal_matrix(), condition="exact"), args.repeats, device
        )
        shared_s, shared = _time(lambda: solve_ridge(problem, weights, condition="none"), args.repeats, device)
        if shared.path == "dense":
            dense_s = shared_s
        else:
            dense_s, _ = _time(
                lambda: solve_ridge(problem, weights, condition="none", path="dense"), args.repeats, device
            )
        stacked_s, stacked = _time(lambda: solve_ridge_stacked(problem, weights), args.repeats, device)
        naive_s, naive = _time(lambda: solve_ridge_unshared(problem, weights), args.repeats, device)
        # Agreement, measured before the cast back to the weights' dtype would hide it.
        weights64 = {k: v.double() for k, v in weights.items()}
        exact = solve_ridge(problem, weights64, condition="none").new_weights
        exact_dense = solve_ridge(problem, weights64, condition="none", path="dense").new_weights
        exact_naive = solve_ridge_unshared(problem, weights64).new_weights
        exact_stacked = solve_ridge_stacked(problem, weights64).new_weights
        max_difference = max(
            max(
                (exact[k] - exact_naive[k]).abs().max().item(),
                (exact[k] - exact_stacked[k]).abs().max().item(),
                (exact[k] - exact_dense[k]).abs().max().item(),
            )
            for k in weights
        )
        same_dtype_results = all(
            torch.equal(shared.new_weights[k], solve_ridge(problem, {k: weights[k]}, condition="none").new_weights[k])
            for k in list(weights)[:2]
        )
        entry = {
            "concepts": concepts,
            "rows": rows,
            "build_s": build_s,
            "cholesky_s": chol_s,
            "condition_number_s": max(with_cond_s - chol_s, 0.0),
            "condition_number": factorization.condition_number,
            "shared_path": shared.path,
            "shared_s": shared_s,
            "dense_s": dense_s,
            "stacked_s": stacked_s,
            "naive_s": naive_s,
            "naive_over_shared": naive_s / shared_s,
            "stacked_over_shared": stacked_s / shared_s,
            "max_abs_difference_float64": max_difference,
            "per_layer_equals_batched": same_dtype_results,
        }
        results.append(entry)
        print(
            f"{concepts:>8} {rows:>6} {build_s:7.3f} {chol_s:7.3f} {entry['condition_number_s']:7.3f} "
            f"{shared.path:>8} {shared_s:7.3f} {dense_s:7.3f} {stacked_s:7.3f} {naive_s:7.3f} "
            f"{entry['naive_over_shared']:12.2f} {entry['stacked_over_shared']:14.2f} {max_difference:8.1e}"
        )

    # The typical compile: one concept, a located window of 3 layers (K and V), exact condition.
    window = {k: v for k, v in weights.items() if k.split(".")[0] in ("attn2[4]", "attn2[5]", "attn2[6]")}
    x_orig = torch.randn(args.rows_per_concept, dim, generator=generator).to(device)
    x_target = torch.randn(args.rows_per_concept, dim, generator=generator).to(device)

    def typical():
        return solve_ridge(build_problem(x_orig, x_target), window, condition="exact")

    typical_s, typical_result = _time(typical, args.repeats, device)
    typical_naive_s, _ = _time(
        lambda: solve_ridge_unshared(build_problem(x_orig, x_target), window), args.repeats, device
    )
    print(
        f"typical compile solve: 1 concept ({args.rows_per_concept} rows), 3 layers x K,V: "
        f"{typical_s:.3f} s incl. exact condition number ({typical_result.path} path, "
        f"cond {typical_result.condition_number:.3g}); naive per-layer {typical_naive_s:.3f} s "
        f"({typical_naive_s / typical_s:.1f}x)"
    )

    report = {
        "benchmark": "solve_scaling",
        "what": "LocoEdit solve for all 16 SD-1.5 cross-attention layers x K and V; seconds are "
        "medians; shared = solve_ridge as compile calls it (one Cholesky, one triangular solve, "
        "one product per weight, low-rank path while 2N < d); dense = the same forced to the "
        "d-column path; "
        "stacked = one Cholesky with all layers' right-hand sides; naive = torch.linalg.solve "
        "per weight; build = forming the d x d statistics of all concepts; condition_number_s = "
        "extra time for the exact condition number (eigvalsh)",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dim": dim,
        "weights": len(weights),
        "sum_d_out": total_out,
        "weight_dtype": args.dtype,
        "rows_per_concept": args.rows_per_concept,
        "repeats": args.repeats,
        "results": results,
        "typical_compile": {
            "concepts": 1,
            "rows": args.rows_per_concept,
            "weights": len(window),
            "seconds_with_exact_condition": typical_s,
            "path": typical_result.path,
            "condition_number": typical_result.condition_number,
            "naive_seconds": typical_naive_s,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(out)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
