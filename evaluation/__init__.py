"""The evaluation engine behind evaluator.py: OpenAI's ADM evaluator in PyTorch.

evaluator_cli holds the command's flags and main; batches reads sample batches and stored statistics; stats computes
and caches Inception activations and their statistics; evaluate runs the evaluation. inception is the network,
inception_weights its weights and backends; metrics the ADM metric math, uncertainty the bootstrap standard errors,
quality_report the quality tables with a floor row.
"""
