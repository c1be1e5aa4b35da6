"""Shared fixtures: the official golden outputs, the fork server, tiny training data (factories: tests/tiny.py)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny import GOLDEN_DIR  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope='session')
def golden():
    """Config, inputs/outputs and state dicts produced by the official code (see fixtures/official_tiny/README.md)."""
    load = lambda name: torch.load(GOLDEN_DIR / name, map_location='cpu', weights_only=True)  # noqa: E731
    return {
        'config': json.loads((GOLDEN_DIR / 'config.json').read_text()),
        'io': load('io.pth'), 'vae': load('vae.pth'), 'var': load('var.pth'), 'viar': load('viar.pth'),
    }


@pytest.fixture(scope='session')
def forkserver():
    """Runs CLI commands in forked children of one warm process (see tests/forkserver.py)."""
    from tests.forkserver import ForkServer
    with ForkServer() as server:
        yield server


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """For the training tests: a tiny ImageFolder (3 classes, odd image modes mixed in) and a tiny tokenizer
    checkpoint, as (images, vae); `tests.train_helpers.data_args` turns it into train.py arguments."""
    from tests.train_helpers import make_image_folder, tiny_tokenizer
    root = tmp_path_factory.mktemp('data')
    make_image_folder(root / 'images')
    return root / 'images', tiny_tokenizer(root / 'vae.pth')
