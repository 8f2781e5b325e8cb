"""Helpers for tests and benchmarks, not for runs: tiny random models with real classes (``tiny``)."""
