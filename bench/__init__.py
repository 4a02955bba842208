"""Benchmarks and the fault zoo (not installed; run from the repository root)."""
