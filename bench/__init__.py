"""The performance benchmark of pyworker, run by hand: `python -m bench.run` (see bench/README.md).

It is not a test: its figures depend on the machine. `tests/devtools/test_bench_smoke.py`
only checks that it still runs from end to end.
"""
