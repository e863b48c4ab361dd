"""Benchmarks: a harness that times competitors side by side, and suites built on it."""
