"""The benchmark harness behind ``make bench``: dicomfleet against the field's baselines.

Run ``python -m bench`` (``--quick`` for a short run); it writes bench/results/latest.json and docs/benchmarks.md.
"""
