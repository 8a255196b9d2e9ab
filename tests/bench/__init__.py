"""Benchmarks: `python -m tests.bench` (as root) runs them; see README.md, "Benchmarks"."""
