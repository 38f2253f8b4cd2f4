"""Benchmarks: run each from the repository root as a module, e.g. `python -m benchmarks.encode_route`
(they share code by importing each other as `benchmarks.<name>`; none edits `sys.path`)."""
