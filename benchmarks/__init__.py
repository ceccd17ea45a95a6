"""Measured comparisons. Each module is runnable (``python -m benchmarks.NAME --help``) and
writes its tables to ``benchmarks/results/``."""
