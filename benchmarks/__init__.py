"""Benchmark scripts (``python -m benchmarks.NAME``), beside the product: nothing in it imports them. Their
measured tables, with the machine and date, are in RESULTS.md."""
