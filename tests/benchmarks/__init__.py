"""fedrun's benchmarks: round overhead, DP step cost and AUROC on real data.

Run them with ``make bench`` (or ``python -m tests.benchmarks.run --help``); the figures go to
``docs/benchmarks.md``.
"""
