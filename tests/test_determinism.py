"""The same recipe gives bit-identical edited tensors whatever the number of CPU threads.

Measured (see compiler/solve.py): the prompt embeddings were already identical with 1 and 2
threads; the float64 Gram products over tens of thousands of rows were not (a multi-threaded
BLAS splits their sums), which moved edited fp32 weights by one ulp. Each thread count needs
its own process (OpenMP reads OMP_NUM_THREADS at start-up). Without the solver's one-thread
guard (``solve._fixed_order``) the two digests below differ on this machine.

A machine whose BLAS happens to sum the same with any thread count would hide a missing guard
from the digests, so each process also records the thread count every float64 product of the
solve ran with: in the two-thread process it must be one, whatever the BLAS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SOLVE = """
    import hashlib, sys, torch
    from compiler import solve
    seen = set()  # intra-op threads of every float64 matrix product
    product = torch.Tensor.__matmul__
    def spy(a, b):
        if a.dtype == torch.float64:
            seen.add(torch.get_num_threads())
        return product(a, b)
    torch.Tensor.__matmul__ = spy
    g = torch.Generator().manual_seed(0)
    d = 128
    rows, targets = torch.randn(3000, d, generator=g), torch.randn(3000, d, generator=g)
    preserve = torch.randn(30000, d, generator=g)
    # float64 weights keep every bit of the solve visible (fp32 rounding can hide a difference)
    olds = {f"w{i}": torch.randn(96, d, generator=g, dtype=torch.float64) for i in range(4)}
    ridge = solve.solve_ridge(solve.build_problem(rows, targets, preserve=preserve), olds)
    quickfix = solve.solve_quickfix(rows[:24].double(), torch.randn(24, 96, generator=g, dtype=torch.float64),
                                    olds["w0"], preserve_keys=preserve[:5000])
    h = hashlib.sha256()
    for result in (ridge, quickfix):
        for name, weight in sorted(result.new_weights.items()):
            h.update(weight.contiguous().numpy().tobytes())
    print(torch.get_num_threads(), h.hexdigest(), ",".join(map(str, sorted(seen))))
"""


def _digest(threads: int) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_SOLVE)], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    return int(out[0]), out[1], out[2]


def test_edited_weights_are_identical_with_one_and_two_threads():
    one, two = _digest(1), _digest(2)
    assert (one[0], two[0]) == (1, 2)
    assert one[1] == two[1]
    assert one[2] == two[2] == "1"  # the solve's float64 sums ran on one thread in both
