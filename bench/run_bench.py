"""``python bench/run_bench.py``: the benchmark harness, which lives in the package
(:mod:`compiler.bench.harness`) so that ``editc bench`` works from an installed wheel. Importing
``bench.run_bench`` gives that module."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.bench import harness  # noqa: E402

if __name__ == "__main__":
    sys.exit(harness.main())
sys.modules[__name__] = harness
