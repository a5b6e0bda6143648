"""Benchmarks and the hostile-input suite (run as scripts or ``python -m bench.…``)."""
