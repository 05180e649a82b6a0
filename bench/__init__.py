"""Benchmarks for ringserve (not tests): ``python -m bench.run``; see docs/benchmarks.md."""
