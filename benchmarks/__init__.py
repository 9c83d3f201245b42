"""Benchmarks of issue 6: `python -m benchmarks.run_all [--quick] [--out results.json]` (see README.md).

Not part of the test suite. Every figure is measured side by side with a reference in the same
run, because the machines here are shared and noisy.
"""
