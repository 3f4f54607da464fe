"""Predicted (pretrain.plan) vs measured (CPU allocator events) peak memory per rank, side by side, for the
layouts of tests/test_plan_measure.py, including the ones the model does not yet predict within 10 % (GAPS).

    python benchmarks/plan_memory.py       # about a minute on 2 cores: 7 one-process + 15 two-process layouts
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package, from a checkout

from tests.dist_utils import run_distributed  # noqa: E402
from tests.test_plan_measure import GAPS, SINGLE, TWO_RANKS, compare, table  # noqa: E402


def main() -> None:
    print("reference: measured = peak of torch's CPU allocator events (pretrain.plan.measure)")
    print(table([(name, 0, *values) for name, values in compare(SINGLE, 1, 0).items()]))
    layouts = TWO_RANKS + GAPS
    ranks = run_distributed("tests.test_plan_measure:measure_all", 2, {"layouts": layouts}, timeout=900)
    print(table([(name, rank, *ranks[rank][name]) for name, *_ in layouts for rank in range(2)]))


if __name__ == "__main__":
    main()
