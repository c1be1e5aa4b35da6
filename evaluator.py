"""OpenAI's ADM evaluator in pure PyTorch: Inception Score, FID, sFID, precision and recall of a sample batch.

    python evaluator.py REF_BATCH SAMPLE_BATCH [--device cuda] [--batch-size 64] [--inception PATH]
    python evaluator.py INPUT --save-stats OUT.npz

The code is in evaluation/: flags and main in evaluation/evaluator_cli.py, the engine beside it.
"""
from evaluation.evaluator_cli import get_parser, main
from utils.cli import main_entry

if __name__ == '__main__':
    main_entry(main, get_parser())
