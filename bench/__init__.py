"""Benchmarks. Each writes JSON to bench/results/; docs/benchmarks.md quotes the figures."""
