"""``python bench/run_bench.py [options]``: ``editc bench`` from a checkout. The harness lives in
the package (:mod:`compiler.bench.harness`) so that ``editc bench`` works from an installed
wheel; its options are the click command's (``editc bench --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.bench.harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
