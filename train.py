"""Train VAR / VIAR on an ImageFolder dataset with a frozen multi-scale tokenizer, following the official recipe.

The code is in training/: flags and main in training/train_cli.py, the trainer in training/ar_trainer.py.
"""
from training.train_cli import get_parser, main
from utils.cli import main_entry

if __name__ == '__main__':
    main_entry(main, get_parser())
