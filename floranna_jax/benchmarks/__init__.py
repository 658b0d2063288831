"""Benchmarks: print figures and write JSON; they assert nothing about time."""
