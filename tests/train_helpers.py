"""Tiny datasets, tokenizer checkpoints and launchers shared by the training tests."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import ROOT, make_vae
from utils.checkpoint import save_atomic
from utils.model_checkpoints import KIND_VQVAE, model_checkpoint

TINY_PATCH_NUMS = (1, 2, 3, 8)   # 16px images through a 2x-downsampling tokenizer
IMAGE_SIDE = 18                  # files are 18px; training resizes to 18 (1.125 x 16) and crops 16
SUBPROCESS_TIMEOUT = 240


def make_image_folder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 2,
                      seed: int = 0, noise: int = 60) -> Path:
    """An ImageFolder of small PNGs: a class colour, pixel noise up to `noise` and a bright square, with a few odd
    image modes mixed in."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, noise + 1, (IMAGE_SIDE, IMAGE_SIDE, 3)).astype(np.uint8)
                arr[..., c % 3] += 150
                y, x = rng.integers(0, IMAGE_SIDE - 6, 2)
                arr[y:y + 6, x:x + 6] = 255 - arr[y:y + 6, x:x + 6]
                img = Image.fromarray(arr)
                if split == 'train' and i == 0:  # a greyscale, an RGBA and a 16-bit greyscale file
                    odd = (img.convert('L'), img.convert('RGBA'), Image.fromarray(arr[..., 0].astype(np.uint16) * 257))
                    img = odd[c % 3]
                img.save(folder / f'{i}.png')
    return root


def tiny_tokenizer(path: Path, seed: int = 0, **kw) -> Path:
    save_atomic(model_checkpoint(KIND_VQVAE, make_vae(seed, patch_nums=TINY_PATCH_NUMS, **kw)), path)
    return path


def subprocess_env() -> Dict[str, str]:
    # One thread per process: the 2-process runs share two cores, and equal settings keep runs comparable.
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}


def launch(script: str, args: Sequence[str], nproc: int = 1) -> List[str]:
    """The command line of a training CLI, under torchrun when nproc > 1."""
    if nproc == 1:
        return [sys.executable, str(ROOT / script), *args]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
            str(ROOT / script), *args]


def run_cli(script: str, args: Sequence[str], nproc: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch(script, args, nproc), cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, f'{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def kill_tree(pid: int):
    """SIGKILL a process and all its descendants at once (torchrun starts its ranks in their own sessions)."""
    children = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_log(out_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (out_dir / 'log.txt').read_text().splitlines() if line.strip()]


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def data_args(data, out_dir, *extra) -> List[str]:
    """train.py arguments for the `data` fixture, writing to out_dir."""
    images, vae = data
    return ['--data_path', str(images), '--vae_ckpt', str(vae), '--out_dir', str(out_dir), *extra]


@pytest.fixture()
def one_thread():
    """In-process training runs on one thread: on a shared 2-core machine OpenMP's spinning threads slow tiny
    models down many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
