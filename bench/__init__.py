"""Benchmarks: each compares implementations side by side in one run and prints a table and JSON."""
