"""Timing benchmarks of hi_jax against reference implementations.

Run them with `make bench` or `make bench-quick` (see docs/benchmarks.md);
`python -m benchmarks.run --help` lists the options.
"""
