"""Benchmarks for aligndistil (run with `python -m bench.run`)."""
