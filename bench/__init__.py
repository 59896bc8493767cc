"""Benchmarks for backchannel (issue #7): ``python -m bench`` or ``python bench/run.py``."""
