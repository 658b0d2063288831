"""Benchmarks and studies: tools, not library. Run from the repository root:
``python -m benchmarks.<name>``; each prints figures, writes JSON under bench_out/ and
asserts nothing about time."""
