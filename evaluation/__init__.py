"""Evaluation engine: the Inception network, ADM metrics, bootstrap standard errors and quality tables."""
