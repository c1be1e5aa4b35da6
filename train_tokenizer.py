"""Train the multi-scale VQVAE tokenizer on an ImageFolder dataset (one process, or torchrun exactly like train.py).

The code is in training/: flags and main in training/train_tokenizer_cli.py, the trainer in
training/tokenizer_trainer.py.
"""
from training.train_tokenizer_cli import get_parser, main
from utils.cli import main_entry

if __name__ == '__main__':
    main_entry(main, get_parser())
