"""Pipelines that chain the project's commands in one process: the CPU demo (train, sample, evaluate, report) and the
stages of the reproduction in miniature (bench/reproduction.py)."""
