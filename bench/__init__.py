"""Benchmarks: each module is a command (python -m bench.<name>) that prints numbers and writes bench/results/."""
