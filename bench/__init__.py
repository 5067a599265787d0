"""Benchmarks (issue 7): run by hand, never as tests. See bench/README.md."""
