"""Every kind of bad input, through the real command-line tools: exit code 2, exactly one line on stderr that names the
flag or file at fault, no traceback, no hang (every case has a timeout), and no output file created, half-written or
overwritten.

Classes covered: unreadable or malformed data; checkpoints that are truncated, unsafe, of another kind or
architecture, non-finite or malformed (config types, missing keys); decoded images that are not finite; .npz batches
and stored statistics (non-finite, not a covariance); iteration schedules and id lists that would never finish;
every numeric flag out of range; malformed token caches, idx files and run .json files; outputs that would overwrite
inputs; unwritable outputs. `test_symlinks_are_never_written_through` plants links at every temp and output name.

Each case runs in its own process: a child of the fork server (tests/forkserver.py: the script's `__main__` block
with real stdio and a real exit code, without paying the torch import each time), and a few as plain
`python SCRIPT ...` subprocesses to show that the launch itself behaves the same.
"""
import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_checkpoint_io import _CreatesFile
from tests.test_fashion_mnist import _write_idx
from tests.test_train import TINY_MODEL, TINY_RUN
from tests.test_train_tokenizer import TINY_VAE
from tests.tiny import ROOT, make_var, save_tiny_checkpoints
from tests.train_helpers import make_image_folder, subprocess_env, tiny_tokenizer
from utils.checkpoint import load_file, save_atomic
from utils.model_checkpoints import KIND_VAR, model_checkpoint

LOG_NAMES = ('stdout.txt', 'log.txt')   # logs a failing run may append to; everything else must stay as it was
SENTINEL = b'an earlier result that must survive'
CASE_TIMEOUT = 120                      # seconds: a case still running then is a hang, and fails
QUIET = {'TQDM_DISABLE': '1'}             # progress bars (sampling.py draws one on stderr) are not messages
HUGE = 1e38                             # finite weights whose activations overflow to Inf, then NaN


def _edited(ckpt: dict, **changes) -> dict:
    """A copy of a checkpoint dict with top-level entries replaced (None: removed)."""
    out = {**ckpt, **changes}
    return {k: v for k, v in out.items() if v is not None}


def _scaled(ckpt: dict, key: str, factor: float) -> dict:
    """A copy of a model checkpoint with one weight multiplied by `factor`."""
    return _edited(ckpt, model={**ckpt['model'], key: ckpt['model'][key] * factor})


def _fashion_raw(root: Path, name: str, edit=None) -> Path:
    """A folder with the four Fashion-MNIST idx files (10 train, 10 test images); `edit(folder)` spoils one."""
    folder = root / name
    folder.mkdir()
    _write_idx(folder, 'train', 10, 0)
    _write_idx(folder, 't10k', 10, 1)
    if edit:
        edit(folder)
    return folder


def _gz(path: Path, data: bytes):
    with gzip.open(path, 'wb') as f:
        f.write(data)


def _stats_npz(path: Path, images: np.ndarray, sigma: np.ndarray, mu_value: float = 0.0):
    """An ADM reference batch whose stored FID statistics use `sigma` (sFID's are the identity)."""
    np.savez(path, arr_0=images, mu=np.full(2048, mu_value, np.float32), sigma=sigma,
             mu_s=np.zeros(2023, np.float32), sigma_s=np.eye(2023, dtype=np.float32))


@pytest.fixture(scope='module')
def p(tmp_path_factory, forkserver):
    """Every input the cases need (shared, never modified) under one folder."""
    root = tmp_path_factory.mktemp('inputs')
    ck = save_tiny_checkpoints(root / 'ckpts')
    viar, vae_ckpt = load_file(ck / 'ar.pth'), load_file(ck / 'vae.pth')
    var = make_var(patch_nums=(1, 2, 3, 4))
    save_atomic(model_checkpoint(KIND_VAR, var, vae_config=viar['vae_config']), root / 'var.pth')
    save_atomic(_edited(viar, model={**viar['model'], 'head.weight': torch.zeros(7, 64)}), root / 'other_arch.pth')
    data = (ck / 'ar.pth').read_bytes()
    (root / 'truncated.pth').write_bytes(data[:len(data) // 2])
    torch.save({'model': viar['model'], 'payload': _CreatesFile(root / 'pwned.txt')}, root / 'evil.pth')
    # non-finite or malformed checkpoints
    save_atomic(_scaled(viar, 'head.weight', float('nan')), root / 'nan_var.pth')
    save_atomic(_scaled(vae_ckpt, 'decoder.conv_in.weight', float('nan')), root / 'nan_vae.pth')
    save_atomic(_scaled(vae_ckpt, 'decoder.conv_in.weight', HUGE), root / 'huge_vae.pth')
    save_atomic(_edited(viar, config={**viar['config'], 'depth': 'two'}), root / 'config_type.pth')
    save_atomic(_edited(viar, config=[1, 2]), root / 'config_list.pth')
    save_atomic(_edited(viar, config={**viar['config'], 'wings': 2}), root / 'config_unknown.pth')
    save_atomic(_edited(viar, model=torch.zeros(3)), root / 'model_tensor.pth')
    save_atomic(_edited(viar, model={**viar['model'], 'head.weight': 'text'}), root / 'model_text.pth')
    save_atomic(torch.zeros(3), root / 'bare_tensor.pth')

    images = make_image_folder(root / 'images', train_per_class=3, val_per_class=1)
    tok = tiny_tokenizer(root / 'tok.pth')
    (root / 'empty').mkdir()
    (root / 'no_classes' / 'train').mkdir(parents=True)
    (root / 'empty_class' / 'train' / 'b').mkdir(parents=True)
    shutil.copytree(images / 'train' / 'class0', root / 'empty_class' / 'train' / 'a')
    shutil.copytree(images, root / 'corrupt')
    bad = root / 'corrupt' / 'train' / 'class1' / '1.png'
    bad.write_bytes(bad.read_bytes()[:60])
    (root / 'raw').mkdir()
    (root / 'blocker').write_text('a file where a folder is expected')
    # a class folder whose only "image" is a FIFO (opening it would block forever), and one that only links back
    shutil.copytree(images / 'train' / 'class0', root / 'fifo_data' / 'train' / 'a')
    (root / 'fifo_data' / 'train' / 'b').mkdir()
    os.mkfifo(root / 'fifo_data' / 'train' / 'b' / 'x.png')
    shutil.copytree(images / 'train' / 'class0', root / 'loop_data' / 'train' / 'a')
    (root / 'loop_data' / 'train' / 'b').mkdir()
    (root / 'loop_data' / 'train' / 'b' / 'again').symlink_to('../a')
    (root / 'loop_data' / 'train' / 'a' / 'loop').symlink_to('..')
    (root / 'fifo_pngs').mkdir()
    os.mkfifo(root / 'fifo_pngs' / '0.png')

    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(root / 'good.npz', arr_0=good)
    np.savez(root / 'no_arr0.npz', images=good)
    np.savez(root / 'float.npz', arr_0=good.astype(np.float32) / 255)
    np.savez(root / 'gray.npz', arr_0=good[..., 0])
    np.savez(root / 'nchw.npz', arr_0=good.transpose(0, 3, 1, 2))
    np.savez(root / 'object.npz', arr_0=np.array([good[0], 'text'], dtype=object))
    eye = np.eye(2048, dtype=np.float32)
    _stats_npz(root / 'not_psd.npz', good, -eye)
    _stats_npz(root / 'asym.npz', good, eye + np.triu(np.ones_like(eye), 1))
    _stats_npz(root / 'nan_mu.npz', good, eye, mu_value=float('nan'))
    (root / 'pngs').mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / 'pngs' / f'{i}.png')
    shutil.copy(root / 'pngs' / '0.png', root / 'photo.png')
    png = root / 'pngs' / '1.png'
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])  # the header reads, the pixels do not

    # Fashion-MNIST idx files, each spoiled in one way
    fm_bytes = lambda d, name: gzip.decompress((d / name).read_bytes())  # noqa: E731
    fm = SimpleNamespace(
        truncated=_fashion_raw(root, 'fm_truncated', lambda d: _gz(
            d / 'train-images-idx3-ubyte.gz', fm_bytes(d, 'train-images-idx3-ubyte.gz')[:-100])),
        header=_fashion_raw(root, 'fm_header', lambda d: _gz(d / 'train-images-idx3-ubyte.gz', b'\x00\x00\x08')),
        magic=_fashion_raw(root, 'fm_magic', lambda d: _gz(
            d / 'train-images-idx3-ubyte.gz', struct.pack('>IIII', 7, 10, 28, 28) + bytes(7840))),
        huge=_fashion_raw(root, 'fm_huge', lambda d: _gz(
            d / 'train-images-idx3-ubyte.gz', struct.pack('>IIII', 2051, 2 ** 31, 2 ** 16, 2 ** 16))),
        labels=_fashion_raw(root, 'fm_labels', lambda d: _gz(
            d / 'train-labels-idx1-ubyte.gz', struct.pack('>II', 2049, 10) + bytes([200] * 10))),
        count=_fashion_raw(root, 'fm_count', lambda d: _gz(
            d / 'train-labels-idx1-ubyte.gz', struct.pack('>II', 2049, 9) + bytes(9))),
        not_gzip=_fashion_raw(root, 'fm_not_gzip', lambda d: (d / 't10k-images-idx3-ubyte.gz').write_bytes(b'x' * 64)),
        no_labels=_fashion_raw(root, 'fm_no_labels', lambda d: (d / 'train-labels-idx1-ubyte.gz').unlink()),
        good=_fashion_raw(root, 'fm_good'))

    run_dir = root / 'run'  # a VIAR training run to resume
    inputs = SimpleNamespace(images=images, tok=tok)
    child = forkserver.run('train.py', train_args(inputs, run_dir, '--save_steps', '2', '--max_steps', '2'),
                           root / 'run_cli')
    assert child.returncode == 0, child.stderr
    run_ckpt_path = run_dir / 'ar-ckpt-last.pth'
    run_ckpt = run_ckpt_path.read_bytes()
    (root / 'truncated_run.pth').write_bytes(run_ckpt[:len(run_ckpt) // 3])
    resumable = load_file(run_ckpt_path)
    save_atomic(_edited(resumable, rng=None, amp=None), root / 'run_no_rng.pth')
    save_atomic(_edited(resumable, it='two'), root / 'run_it_text.pth')
    save_atomic(_edited(resumable, rng=['state']), root / 'run_bad_rng.pth')
    save_atomic(_edited(resumable, config={**resumable['config'], 'embed_dim': 64.5}), root / 'run_config.pth')
    # a tokenizer training run (its checkpoint, given to train.py --resume, must be recognised as such)
    child = forkserver.run('train_tokenizer.py', tokenizer_args(inputs, root / 'tok_run'), root / 'tok_cli')
    assert child.returncode == 0, child.stderr
    # a token cache for train.py --token_cache (the cases copy it and spoil the copy)
    child = forkserver.run('train.py', train_args(inputs, root / 'cache_run', '--max_steps', '2', '--token_cache',
                                                  root / 'cache'), root / 'cache_cli')
    assert child.returncode == 0, child.stderr
    return SimpleNamespace(root=root, viar=ck / 'ar.pth', vae=ck / 'vae.pth', var=root / 'var.pth',
                           other_arch=root / 'other_arch.pth', truncated=root / 'truncated.pth',
                           evil=root / 'evil.pth', marker=root / 'pwned.txt', images=images, tok=tok,
                           empty=root / 'empty', no_classes=root / 'no_classes', empty_class=root / 'empty_class',
                           corrupt=root / 'corrupt', bad_image=bad, raw=root / 'raw', blocker=root / 'blocker',
                           good=root / 'good.npz', no_arr0=root / 'no_arr0.npz', float=root / 'float.npz',
                           gray=root / 'gray.npz', nchw=root / 'nchw.npz', object=root / 'object.npz',
                           pngs=root / 'pngs', run=run_dir, truncated_run=root / 'truncated_run.pth', fm=fm,
                           tok_run=root / 'tok_run', cache=root / 'cache', photo=root / 'photo.png')


# ---- command lines (`o` is the case's own output folder) -----------------------------------------------------------
def train_args(p, out, *extra, data=None):
    return ['--data_path', data or p.images, '--vae_ckpt', p.tok, '--out_dir', out, *TINY_MODEL, *TINY_RUN,
            '--workers', '0', '--max_steps', '4', *extra]


def tokenizer_args(p, out, *extra, data=None):
    return ['--data_path', data or p.images, '--out_dir', out, *TINY_VAE, '--bs', '4', '--workers', '0',
            '--max_steps', '2', '--no-progress', *extra]


def sampling_args(p, out, *extra, ckpt=None, vae=None):
    return ['--ckpt', ckpt or p.viar, '--vae_ckpt', vae or p.vae, '--sample_dir', out, '--name', 'run',
            '--per_class', '1', '--batch_size', '2', '--top_k', '10', '--schedule', 'const:2', *extra]


def gen_args(p, out, *extra, ckpt=None, vae=None):
    return ['--ckpt', ckpt or p.viar, '--vae_ckpt', vae or p.vae, '--out_dir', out, '--classes', '1', '--seeds', '0',
            '--top_k', '10', '--schedule', 'const:2', *extra]


def eval_args(p, out, *batches):
    return [*batches, '--device', 'cpu', '--no-progress']


def tok_init_args(p, out, ckpt, *extra):
    """train_tokenizer.py from --init_from (which fixes the architecture: no TINY_VAE flags)."""
    return ['--data_path', p.images, '--out_dir', out, '--init_from', ckpt, '--bs', '4', '--workers', '0',
            '--max_steps', '2', '--no-progress', *extra]


def fm_args(p, out, raw, *extra):
    return ['--out', out / 'fm', '--raw_dir', raw, *extra]


def demo_args(p, out, *extra):
    return ['--quick', '--data', out / 'fm', '--out', out / 'demo', *extra]


# ---- per-case preparation of the output folder (after the earlier results are in place) ----------------------------
def copy_cache(spoil):
    """Setup: a copy of the token cache in OUT/cache, spoiled by `spoil(tokens .npy, labels .npy, meta .json)`."""
    def setup(p, out):
        shutil.copytree(p.cache, out / 'cache')
        tokens = next(f for f in (out / 'cache').glob('tokens-*.npy') if not f.name.endswith('.labels.npy'))
        spoil(tokens, tokens.with_name(tokens.stem + '.labels.npy'), tokens.with_suffix('.json'))
    return setup


def _set_npy(path: Path, value: int):
    arr = np.load(path)
    arr.flat[0] = value
    np.save(path, arr)


def _cut(path: Path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def png_at(name: str):
    """Setup: a real PNG at OUT/name (an input that the command would overwrite)."""
    return lambda p, out: shutil.copy(p.photo, out / name)


def text_at(name: str, text: str):
    return lambda p, out: (out / name).write_text(text)


T, TT, S, G, E, D = 'train.py', 'train_tokenizer.py', 'sampling.py', 'gen_img.py', 'evaluator.py', 'demo.py'
X, FM = 'utils/export.py', 'utils/fashion_mnist.py'
REAL = 'real'  # also launched as a plain `python SCRIPT ...` subprocess


class NEW_FILES(tuple):
    """Names of files a case may create beside the earlier outputs (sampling.py records its knobs before sampling)."""

    def __new__(cls, *names):
        return super().__new__(cls, names)


# (case, script, argv from (inputs, output folder), fragment the error line must contain[, REAL][, setup(p, out)]
#  [, NEW_FILES(...)])
CASES = [
    # data
    ('missing data root', T, lambda p, o: train_args(p, o, data=p.root / 'nope'), 'does not exist', REAL),
    ('empty data root', T, lambda p, o: train_args(p, o, data=p.empty), 'has no train/ folder'),
    ('no class folders', T, lambda p, o: train_args(p, o, data=p.no_classes), 'holds no class folders'),
    ('class folder without images', T, lambda p, o: train_args(p, o, data=p.empty_class),
     f'{Path("train") / "b"} has no images'),
    ('truncated image', T, lambda p, o: train_args(p, o, data=p.corrupt), 'cannot read image'),
    ('tokenizer: missing data root', TT, lambda p, o: tokenizer_args(p, o, data=p.root / 'nope'), 'does not exist'),
    ('tokenizer: truncated image', TT, lambda p, o: tokenizer_args(p, o, data=p.corrupt), 'cannot read image'),
    ('demo: no Fashion-MNIST files in --raw_dir', D, lambda p, o: demo_args(p, o, '--raw_dir', p.raw), '--raw_dir'),
    ('evaluator: truncated PNG in a folder', E, lambda p, o: eval_args(p, o, p.pngs, '--save-stats', o / 's.npz'),
     '1.png: cannot read this image'),
    # data folders that would hang or count files twice: a FIFO is skipped, a folder reached again is skipped
    ('FIFO as the only image of a class', T, lambda p, o: train_args(p, o, data=p.root / 'fifo_data'),
     f'{Path("train") / "b"} has no images'),
    ('tokenizer: FIFO in the data', TT, lambda p, o: tokenizer_args(p, o, data=p.root / 'fifo_data'),
     f'{Path("train") / "b"} has no images'),
    ('class folder that only links back to another', T, lambda p, o: train_args(p, o, data=p.root / 'loop_data'),
     f'{Path("train") / "b"} has no images'),
    ('evaluator: FIFO named .png', E, lambda p, o: eval_args(p, o, p.root / 'fifo_pngs', p.good),
     'no .png files'),
    ('gen_img: FIFO as --edit_image', G, lambda p, o: gen_args(p, o, '--edit_image', p.root / 'fifo_pngs' / '0.png',
                                                              '--box', '0,0,1,1'), 'edit image not found'),
    # checkpoints
    ('checkpoint of another architecture', S, lambda p, o: sampling_args(p, o, ckpt=p.other_arch),
     'shape mismatch: head.weight (7, 64) vs model (32, 64)'),
    ('tokenizer given as the transformer', G, lambda p, o: gen_args(p, o, ckpt=p.vae), 'is a vqvae checkpoint'),
    ('truncated checkpoint', S, lambda p, o: sampling_args(p, o, ckpt=p.truncated), 'truncated or corrupt'),
    ('truncated tokenizer checkpoint', T, lambda p, o: train_args(p, o, '--vae_ckpt', p.truncated),
     'truncated or corrupt'),
    ('truncated --resume checkpoint', T, lambda p, o: train_args(p, o, '--resume', p.truncated_run),
     'truncated or corrupt'),
    ('pickled payload in a checkpoint', G, lambda p, o: gen_args(p, o, ckpt=p.evil), 'unpickling them could run'),
    ('VAR checkpoint with --use_implicit', S, lambda p, o: sampling_args(p, o, '--use_implicit', ckpt=p.var),
     'is an explicit VAR checkpoint'),
    ('VIAR checkpoint with --no-use_implicit', G, lambda p, o: gen_args(p, o, '--no-use_implicit'),
     'is a VIAR (implicit) checkpoint'),
    ('resume a VIAR run with explicit-VAR flags', T, lambda p, o: train_args(p, o, '--no-use_implicit'),
     'was trained with use_implicit=True (flags: False)'),
    ('resume with another depth', T, lambda p, o: train_args(p, o, '--depth', '3'), 'was trained with depth=2'),
    ('resume with another learning rate', T, lambda p, o: train_args(p, o, '--tblr', '0.5'),
     '(now 0.5); pass the same flags, --resume'),
    # checkpoints whose weights are not finite: a silent black sample set, or a failure deep inside sampling
    ('NaN in the tokenizer', S, lambda p, o: sampling_args(p, o, vae=p.root / 'nan_vae.pth'),
     'nan_vae.pth: weights are not finite: NaN/Inf in decoder.conv_in.weight', REAL),
    ('NaN in the transformer', S, lambda p, o: sampling_args(p, o, ckpt=p.root / 'nan_var.pth'),
     'nan_var.pth: weights are not finite: NaN/Inf in head.weight'),
    ('gen_img: NaN in the transformer', G, lambda p, o: gen_args(p, o, ckpt=p.root / 'nan_var.pth'),
     'weights are not finite'),
    ('train: NaN in --vae_ckpt', T, lambda p, o: train_args(p, o, '--vae_ckpt', p.root / 'nan_vae.pth'),
     'nan_vae.pth: weights are not finite'),
    ('tokenizer: NaN in --init_from', TT, lambda p, o: tok_init_args(p, o, p.root / 'nan_vae.pth'),
     'nan_vae.pth: weights are not finite'),
    ('decoded images not finite (sampling)', S, lambda p, o: sampling_args(p, o, vae=p.root / 'huge_vae.pth'),
     'decoded images hold NaN/Inf', NEW_FILES('run.json')),
    ('decoded images not finite (gen_img)', G, lambda p, o: gen_args(p, o, vae=p.root / 'huge_vae.pth'),
     'decoded images hold NaN/Inf'),
    # checkpoint contents that do not fit the schema
    ('config with a wrong type', S, lambda p, o: sampling_args(p, o, ckpt=p.root / 'config_type.pth'),
     "config_type.pth: the stored config is invalid (VARConfig: field depth must be int, found 'two')"),
    ('config that is not a dict', G, lambda p, o: gen_args(p, o, ckpt=p.root / 'config_list.pth'),
     'config_list.pth: the stored config is invalid'),
    ('config with an unknown field', S, lambda p, o: sampling_args(p, o, ckpt=p.root / 'config_unknown.pth'),
     "unknown field(s) ['wings']"),
    ('model entry that is a tensor', S, lambda p, o: sampling_args(p, o, ckpt=p.root / 'model_tensor.pth'),
     'model_tensor.pth: its model entry is a Tensor, not a state dict'),
    ('state dict holding text', G, lambda p, o: gen_args(p, o, ckpt=p.root / 'model_text.pth'),
     "model_text.pth: expected a state dict (parameter name -> tensor), found a dict whose entry 'head.weight'"),
    ('bare tensor as the checkpoint', S, lambda p, o: sampling_args(p, o, ckpt=p.root / 'bare_tensor.pth'),
     'bare_tensor.pth: expected a state dict or checkpoint dict, found Tensor'),
    ('tokenizer: bare tensor as --init_from', TT,
     lambda p, o: tok_init_args(p, o, p.root / 'bare_tensor.pth'), 'bare_tensor.pth: expected a'),
    ('tokenizer: transformer as --init_from', TT, lambda p, o: tok_init_args(p, o, p.viar),
     'is a var checkpoint'),
    ('--resume checkpoint without rng and amp', T,
     lambda p, o: train_args(p, o, '--resume', p.root / 'run_no_rng.pth'),
     'run_no_rng.pth: training checkpoint without amp, rng'),
    ('--resume checkpoint with a text iteration', T,
     lambda p, o: train_args(p, o, '--resume', p.root / 'run_it_text.pth'),
     'malformed training checkpoint (it is a str'),
    ('--resume checkpoint with malformed RNG states', T,
     lambda p, o: train_args(p, o, '--resume', p.root / 'run_bad_rng.pth'), 'rng is not a list of RNG states'),
    ('--resume checkpoint with a float width', T,
     lambda p, o: train_args(p, o, '--resume', p.root / 'run_config.pth'), 'embed_dim=64.5'),
    ('--resume of a tokenizer training checkpoint', T,
     lambda p, o: train_args(p, o, '--resume', p.tok_run / 'vae-ckpt-last.pth'),
     'is a tokenizer (VQVAE) checkpoint from train_tokenizer.py, not a train.py checkpoint'),
    ('tokenizer: --resume of a transformer run', TT,
     lambda p, o: tokenizer_args(p, o, '--resume', p.run / 'ar-ckpt-last.pth'),
     'is a transformer (VAR/VIAR) checkpoint from train.py, not a train_tokenizer.py checkpoint'),
    ('--resume of a bare tensor', T, lambda p, o: train_args(p, o, '--resume', p.root / 'bare_tensor.pth'),
     'holds a Tensor, not a training checkpoint'),
    # token caches
    ('token ids beyond the vocabulary', T, lambda p, o: train_args(p, o, '--token_cache', o / 'cache'),
     'token ids outside [0, 31]', copy_cache(lambda t, l, m: _set_npy(t, 999))),
    ('truncated token cache', T, lambda p, o: train_args(p, o, '--token_cache', o / 'cache'),
     'unreadable token cache', copy_cache(lambda t, l, m: _cut(t))),
    ('token cache labels out of range', T, lambda p, o: train_args(p, o, '--token_cache', o / 'cache'),
     'labels outside [0, 2]', copy_cache(lambda t, l, m: _set_npy(l, 7))),
    ('token cache .json that is not an object', T, lambda p, o: train_args(p, o, '--token_cache', o / 'cache'),
     'expected a JSON object, found list', copy_cache(lambda t, l, m: m.write_text('[1]'))),
    # .npz batches and stored statistics
    ('.npz without arr_0', E, lambda p, o: eval_args(p, o, p.no_arr0, p.good), 'has no arr_0', REAL),
    ('.npz of float images', E, lambda p, o: eval_args(p, o, p.good, p.float), 'must hold uint8 images'),
    ('.npz without a channel axis', E, lambda p, o: eval_args(p, o, p.good, p.gray), 'must be RGB images of shape'),
    ('.npz in NCHW', E, lambda p, o: eval_args(p, o, p.nchw, p.good), 'looks like NCHW'),
    ('.npz holding pickled objects', E, lambda p, o: eval_args(p, o, p.good, p.object), 'must hold uint8 images'),
    ('stored sigma not positive semi-definite', E, lambda p, o: eval_args(p, o, p.root / 'not_psd.npz', p.good),
     'not_psd.npz: sigma is not positive semi-definite'),
    ('stored sigma not symmetric', E, lambda p, o: eval_args(p, o, p.good, p.root / 'asym.npz'),
     'asym.npz: sigma is not symmetric'),
    ('stored mu with NaN', E, lambda p, o: eval_args(p, o, p.root / 'nan_mu.npz', p.good),
     'nan_mu.npz: mu holds NaN/Inf'),
    # iteration schedules and id lists: bounded, so that a typo cannot run for ever or exhaust memory
    ('negative iterations', S, lambda p, o: sampling_args(p, o, '--schedule', 'const:-1'), 'non-negative'),
    ('negative entry in a list', G, lambda p, o: gen_args(p, o, '--schedule', 'list:1,2,-3,4'), 'non-negative'),
    ('zero-length list', S, lambda p, o: sampling_args(p, o, '--schedule', 'list:'), 'empty list'),
    ('wrong-length list', G, lambda p, o: gen_args(p, o, '--schedule', 'list:1,2'),
     'lists 2 iteration counts but the model has 4'),
    ('a billion iterations per scale', S, lambda p, o: sampling_args(p, o, '--schedule', 'const:1000000000'),
     'above the limit of 1000 iterations per scale'),
    ('a billion iterations in a list', G, lambda p, o: gen_args(p, o, '--schedule', 'list:1,1,1,1000000000'),
     'above the limit of 1000'),
    ('budget with a huge cap', S, lambda p, o: sampling_args(p, o, '--schedule', 'budget:5,100000000'),
     'budget cap 100000000 is above the limit'),
    ('adaptive with a huge cap', G, lambda p, o: gen_args(p, o, '--schedule', 'adaptive:0.01,100000000'),
     'above the limit'),
    ('infinite budget', S, lambda p, o: sampling_args(p, o, '--schedule', 'budget:inf'),
     'budget must be a positive number'),
    ('--seeds spanning 10^14 seeds', G, lambda p, o: gen_args(p, o, '--seeds', '0-99999999999999'),
     'more than the limit of 10000'),
    ('--seeds beyond 2^63', G, lambda p, o: gen_args(p, o, '--seeds', '9223372036854775808'),
     '--seeds 9223372036854775808 is out of range'),
    ('negative seed in --seeds', G, lambda p, o: gen_args(p, o, '--seeds', '3,-1'), '--seeds -1 is out of range'),
    ('--classes spanning 10^12 ids', S, lambda p, o: sampling_args(p, o, '--classes', '0-999999999999'),
     'more than the limit'),
    # sampling knobs
    ('class id out of range', S, lambda p, o: sampling_args(p, o, '--classes', '7'), 'out of range'),
    ('negative class id', G, lambda p, o: gen_args(p, o, '--classes', '-1'), 'out of range'),
    ('--edit_class out of range', G, lambda p, o: gen_args(p, o, '--edit_image', p.photo, '--box', '0,0,1,1',
                                                           '--edit_class', '9'), '--edit_class must be -1 or in'),
    # inputs are never outputs
    ('export into its own folder', X, lambda p, o: [p.viar, '--out_dir', p.viar.parent],
     'would be overwritten by an output'),
    ('export with --name of the input', X, lambda p, o: [p.tok, '--out_dir', p.root, '--name', 'tok', '--formats',
                                                          'pth'], 'pass another --out_dir or --name'),
    ('--edit_image that is an output', G,
     lambda p, o: gen_args(p, o, '--edit_image', o / 'source.png', '--box', '0,0,0.5,0.5'),
     'source.png would be overwritten by an output', png_at('source.png')),
    ('--mask that is an output', G,
     lambda p, o: gen_args(p, o, '--edit_image', p.photo, '--mask', o / 'grid.png'),
     '--mask', png_at('grid.png')),
    ('--save-stats onto its input', E, lambda p, o: eval_args(p, o, p.good, '--save-stats', p.good),
     'would overwrite the input'),
    # files beside the outputs that must hold an object
    ("a run's .json that is a list", S, lambda p, o: sampling_args(p, o), 'run.json: expected a JSON object',
     text_at('run.json', '[1, 2]')),
    ("a run's .json that is not JSON", S, lambda p, o: sampling_args(p, o), 'run.json: not a readable JSON file',
     text_at('run.json', '{"knobs": ')),
    ("a run's .json without knobs", S, lambda p, o: sampling_args(p, o), 'run.json: holds no knobs object',
     text_at('run.json', '{"npz": 1}')),
    # Fashion-MNIST idx files
    ('truncated idx images', FM, lambda p, o: fm_args(p, o, p.fm.truncated), 'truncated idx file'),
    ('idx header cut short', FM, lambda p, o: fm_args(p, o, p.fm.header), 'truncated idx file (header'),
    ('idx file with a wrong magic', FM, lambda p, o: fm_args(p, o, p.fm.magic), 'not an idx image file (magic 7'),
    ('idx header announcing 2^63 bytes', FM, lambda p, o: fm_args(p, o, p.fm.huge), 'malformed idx header'),
    ('idx labels beyond the 10 classes', FM, lambda p, o: fm_args(p, o, p.fm.labels), 'label 200 is out of range'),
    ('idx labels of another image file', FM, lambda p, o: fm_args(p, o, p.fm.count), 'not the label file of'),
    ('idx file that is not gzip', FM, lambda p, o: fm_args(p, o, p.fm.not_gzip),
     't10k-images-idx3-ubyte.gz: not a readable gzip file'),
    ('missing idx labels', FM, lambda p, o: fm_args(p, o, p.fm.no_labels),
     'train-labels-idx1-ubyte.gz: Fashion-MNIST file not found'),
    ('demo: truncated idx images', D, lambda p, o: demo_args(p, o, '--raw_dir', p.fm.truncated), 'truncated idx file'),
    ('demo: idx labels beyond the classes', D, lambda p, o: demo_args(p, o, '--raw_dir', p.fm.labels),
     'out of range'),
    # unwritable outputs
    ('sampling: unwritable --sample_dir', S, lambda p, o: sampling_args(p, p.blocker / 'sub'),
     '--sample_dir: ' + 'BLOCKER/sub is not a writable folder'),
    ('gen_img: unwritable --out_dir', G, lambda p, o: gen_args(p, p.blocker / 'sub'), 'is not a writable folder'),
    ('train: unwritable --out_dir', T, lambda p, o: train_args(p, p.blocker / 'sub'), '--out_dir: BLOCKER/sub is not'),
    ('tokenizer: unwritable --out_dir', TT, lambda p, o: tokenizer_args(p, p.blocker / 'sub'),
     'is not a writable folder'),
    ('demo: unwritable --out', D, lambda p, o: ['--quick', '--out', p.blocker / 'sub'], 'is not a writable folder'),
    ('evaluator: --save-stats into a missing folder', E,
     lambda p, o: eval_args(p, o, p.good, '--save-stats', o / 'nope' / 's.npz'), 'does not exist'),
    ('fashion_mnist: unwritable --out', FM, lambda p, o: ['--out', p.blocker / 'sub', '--raw_dir', p.fm.good],
     'is not a writable folder'),
]

# Numeric flags out of range: refused by the argparse types (utils/cli.py) before any file is read or written.
# (script, argv builder, flag, bad value[s])
NUMERIC = [
    (S, sampling_args, '--cfg', 'nan'), (G, gen_args, '--cfg', 'inf'), (S, sampling_args, '--cfg', '-1'),
    (S, sampling_args, '--top_p', '1.5'), (G, gen_args, '--top_p', '-0.1'), (S, sampling_args, '--top_p', 'nan'),
    (G, gen_args, '--top_k', '-1'), (S, sampling_args, '--iter_left', '-1'), (G, gen_args, '--iter_right', '2000'),
    (S, sampling_args, '--batch_size', '0'), (G, gen_args, '--batch_size', '0'), (S, sampling_args, '--per_class', '0'),
    (S, sampling_args, '--per_class', '1000000000'), (S, sampling_args, '--seed', str(2 ** 63)),
    (S, sampling_args, '--seed', '-1'), (G, gen_args, '--nrow', '-1'), (G, gen_args, '--edit_class', '-2'),
    (G, gen_args, '--subnet_depth', '0'), (S, sampling_args, '--bridge', '-1'), (G, gen_args, '--depth', '0'),
    (T, train_args, '--ls', '2'), (T, train_args, '--drop_path_rate', '1.5'), (T, train_args, '--bs', '0'),
    (T, train_args, '--ac', '0'), (T, train_args, '--ep', '0'), (T, train_args, '--tblr', 'nan'),
    (T, train_args, '--tlr', '-1'), (T, train_args, '--twd', 'inf'), (T, train_args, '--tclip', '-2'),
    (T, train_args, '--wp', '-1'), (T, train_args, '--betas', '1', '0.9'), (T, train_args, '--seed', str(2 ** 64)),
    (T, train_args, '--save_freq', '0'), (T, train_args, '--save_steps', '-1'), (T, train_args, '--keep_last', '0'),
    (T, train_args, '--max_nonfinite', '0'), (T, train_args, '--log_freq', '0'), (T, train_args, '--dist_timeout', '0'),
    (T, train_args, '--mid_reso', '0.5'), (T, train_args, '--workers', '-2'), (T, train_args, '--depth', '0'),
    (T, train_args, '--embed_dim', '-64'), (T, train_args, '--num_heads', '0'), (T, train_args, '--p_depth', '-1'),
    (T, train_args, '--no_grad_iters_range', '0', '5000'), (T, train_args, '--eval_iters', '-1'),
    (T, train_args, '--init_std', 'nan'), (T, train_args, '--cond_drop_rate', '1.5'),
    (T, train_args, '--subnet_p_start', '2'), (T, train_args, '--phase1_epochs', '-1'), (T, train_args, '--pn', '0_1'),
    (TT, tokenizer_args, '--vocab_size', '0'), (TT, tokenizer_args, '--z_channels', '0'),
    (TT, tokenizer_args, '--ch_mult', '1', '0'), (TT, tokenizer_args, '--num_res_blocks', '0'),
    (TT, tokenizer_args, '--beta', '-1'), (TT, tokenizer_args, '--quant_resi', '2'),
    (TT, tokenizer_args, '--gan_weight', 'nan'), (TT, tokenizer_args, '--disc_start', '-1'),
    (TT, tokenizer_args, '--disc_layers', '0'), (TT, tokenizer_args, '--restart_every', '-1'),
    (TT, tokenizer_args, '--dead_threshold', 'inf'), (TT, tokenizer_args, '--bs', '0'),
    (E, lambda p, o, *x: eval_args(p, o, p.good, p.good, *x), '--batch-size', '0'),
    (E, lambda p, o, *x: eval_args(p, o, p.good, p.good, *x), '--is-seed', '-1'),
    (E, lambda p, o, *x: eval_args(p, o, p.good, p.good, *x), '--bootstrap', '1000000000'),
    (T, train_args, '--pg', 'nan'), (T, train_args, '--pg0', '0'), (T, train_args, '--patch_size', '-16'),
    (D, demo_args, '--seed', '-1'),
    (FM, lambda p, o, *x: fm_args(p, o, p.fm.good, *x), '--per_class', '-1'),
    (FM, lambda p, o, *x: fm_args(p, o, p.fm.good, *x), '--size', '0'),
    (FM, lambda p, o, *x: fm_args(p, o, p.fm.good, *x), '--val_per_class', '0'),
]
CASES += [(f'{Path(script).name.split(".")[0]}: {flag} {" ".join(values)}', script,
           lambda p, o, build=build, flag=flag, values=values: build(p, o, flag, *values), flag)
          for script, build, flag, *values in NUMERIC]


def snapshot(*folders: Path) -> dict:
    """Every file's bytes, logs aside."""
    return {f: f.read_bytes() for folder in folders for f in sorted(folder.rglob('*'))
            if f.is_file() and f.name not in LOG_NAMES and not f.name.startswith('events.out.tfevents')}


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_touches_nothing(case, p, forkserver, tmp_path):
    name, script, argv, fragment, *extras = case
    out = tmp_path / 'out'
    if script == T:  # an earlier training run in the output folder, which --resume auto picks up
        shutil.copytree(p.run, out)
    else:  # an earlier result in the output folder, under the names the tool writes
        out.mkdir()
        for file in ('run.npz', 'class1_seed0.png', 's.npz', 'tok.pth'):
            (out / file).write_bytes(SENTINEL)
    for setup in (e for e in extras if callable(e)):
        setup(p, out)
    argv = [str(a) for a in argv(p, out)]
    fragment = fragment.replace('BLOCKER', str(p.blocker))
    before = snapshot(p.root, out)
    launches = [('fork', forkserver.run(script, argv, tmp_path / 'cli', env=QUIET, timeout=CASE_TIMEOUT))]
    if REAL in extras:
        launches.append(('subprocess', subprocess.run([sys.executable, script, *argv], cwd=ROOT,
                                                      env={**subprocess_env(), **QUIET},
                                                      capture_output=True, text=True, timeout=CASE_TIMEOUT)))
    for how, proc in launches:
        stdout = proc.stdout
        stderr = proc.stderr
        lines = stderr.splitlines()
        assert proc.returncode == 2, (how, proc.returncode, stderr[-3000:])
        prefix = f'{Path(script).name}: error: '
        assert len(lines) == 1 and lines[0].startswith(prefix) and fragment in lines[0], (how, stderr)
        assert 'Traceback' not in stderr + stdout, how
    after = snapshot(p.root, out)
    new = next((e for e in extras if isinstance(e, NEW_FILES)), NEW_FILES())
    assert {f: after.get(f) for f in before} == before  # earlier outputs and inputs byte-identical
    assert sorted(f.name for f in set(after) - set(before)) == sorted(new)
    assert not p.marker.exists()


def test_odd_image_modes_train(p, forkserver, tmp_path):
    """Greyscale, RGBA and 16-bit files (make_image_folder mixes them in) are converted, not refused."""
    modes = {Image.open(f).mode for f in p.images.rglob('*.png')}
    assert {'L', 'RGBA', 'I;16'} <= modes, modes
    child = forkserver.run(T, train_args(p, tmp_path / 'out', '--max_steps', '2'), tmp_path / 'cli')
    assert child.returncode == 0, child.stderr


# ---- symbolic links planted at temp and output names are replaced or refused, never written through ---------------
def _plant(folder: Path, names, victims: Path) -> dict:
    """A symbolic link at each name under `folder`, pointing to a victim file of its own; returns {victim: bytes}."""
    planted = {}
    for name in names:
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        victim = victims / name.replace('/', '_')
        victim.write_bytes(SENTINEL + b' ' + name.encode())
        link.symlink_to(victim)
        planted[victim] = victim.read_bytes()
    return planted


def _cache_key(p) -> str:
    return next(p.cache.glob('*.json')).stem.split('-', 1)[1]


SYMLINK_RUNS = {  # tool -> (script, argv from (inputs, output folder), names to plant, expected exit code)
    'sampling': (S, lambda p, o: sampling_args(p, o, '--classes', '0-1'),
                 ['run.npz', '.run.npz.tmp', '.run.json.tmp', 'run/.000000.png.tmp', '.write_test', '.write_test.tmp'],
                 0),
    'gen_img': (G, lambda p, o: gen_args(p, o, '--seeds', '0', '1', '--save_grid', '--trace'),
                ['class1_seed0.png', '.class1_seed0.png.tmp', 'class1_seed1.png', 'grid.png', 'trace.json', 'trace.png', '.trace.json.tmp',
                 '.write_test'], 0),
    'train': (T, lambda p, o: train_args(p, o, '--max_steps', '2', '--resume', 'none', '--token_cache', o / 'cache'),
              ['ar-ckpt-00000002.pth', '.ar-ckpt-00000002.pth.tmp', 'ar-ckpt-last.pth', '.ar-ckpt-last.pth.tmp',
               'log.txt', '.log.txt.tmp', '.write_test', 'cache/.tokens-KEY.npy.tmp',
               'cache/.tokens-KEY.labels.npy.tmp', 'cache/tokens-KEY.npy', 'cache/tokens-KEY.labels.npy'], 0),
    'train_tokenizer': (TT, lambda p, o: tokenizer_args(p, o, '--resume', 'none'),
                        ['vae-ckpt-00000002.pth', 'vae-ckpt-last.pth', 'vae-last.pth', '.vae-last.pth.tmp', 'log.txt',
                         '.write_test'], 0),
    'export': (X, lambda p, o: [p.viar, '--out_dir', o], ['ar.pth', '.ar.pth.tmp', 'ar.safetensors'], 0),
    'fashion_mnist': (FM, lambda p, o: fm_args(p, o, p.fm.good), ['fm/.prepared.json.tmp',
                                                                  'fm/train/0-tshirt-top/00000.png'], 0),
    'train: stdout.txt is a link': (T, train_args, ['stdout.txt'], 2),
}


@pytest.mark.parametrize('tool', SYMLINK_RUNS)
def test_symlinks_are_never_written_through(tool, p, forkserver, tmp_path):
    script, argv, names, code = SYMLINK_RUNS[tool]
    out, victims = tmp_path / 'out', tmp_path / 'victims'
    victims.mkdir()
    names = [n.replace('KEY', _cache_key(p)) for n in names]
    planted = _plant(out, names, victims)
    child = forkserver.run(script, [str(a) for a in argv(p, out)], tmp_path / 'cli', env=QUIET, timeout=CASE_TIMEOUT)
    assert child.returncode == code, child.stderr[-3000:]
    assert {v: v.read_bytes() for v in planted} == planted
    if code:
        lines = child.stderr.splitlines()
        assert len(lines) == 1 and names[0] in lines[0] and 'symbolic link' in lines[0], child.stderr
    else:  # every output is a new regular file in the link's place; no temp file of ours is left
        outputs = [out / n for n in names if not Path(n).name.startswith('.')]
        assert outputs and all(f.is_file() and not f.is_symlink() for f in outputs), names
        assert not [f for f in out.rglob('.*.tmp') if not f.is_symlink()]


def test_image_folder_counts_each_file_once(p, tmp_path):
    """A link loop and a link to another class's image are walked once; a FIFO is skipped without blocking."""
    from training.data import build_datasets
    root = tmp_path / 'data'
    shutil.copytree(p.images / 'train', root / 'train')
    (root / 'train' / 'class0' / 'loop').symlink_to('..')
    (root / 'train' / 'class1' / 'dup.png').symlink_to(root / 'train' / 'class0' / '1.png')
    os.mkfifo(root / 'train' / 'class2' / 'fifo.png')
    train, _ = build_datasets(root, 16)
    real = sorted(str(f) for f in (p.images / 'train').rglob('*.png'))
    assert len(train.samples) == len(real)
    assert [(Path(f).parent.name, Path(f).name, c) for f, c in train.samples] == \
        [(Path(f).parent.name, Path(f).name, int(Path(f).parent.name[-1])) for f in real]


def test_atomic_writer_replaces_links_and_refuses_appending_through_them(tmp_path):
    from utils.fileio import LinkRefused, atomic_write, create_new, link_atomic, open_append
    victim = tmp_path / 'victim'
    victim.write_bytes(SENTINEL)
    for name in ('a', 'b', 'c'):
        (tmp_path / name).symlink_to(victim)
    with atomic_write(tmp_path / 'a') as f:
        f.write(b'new')
    with create_new(tmp_path / 'b') as f:
        f.write(b'new')
    src = tmp_path / 'src'
    src.write_bytes(b'new')
    link_atomic(src, tmp_path / 'c')
    with pytest.raises(LinkRefused, match='symbolic link'):
        open_append(_link(tmp_path / 'd', victim))
    assert victim.read_bytes() == SENTINEL
    assert all((tmp_path / n).read_bytes() == b'new' and not (tmp_path / n).is_symlink() for n in 'abc')
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / 'e') as f:
            f.write(b'half')
            raise ValueError('interrupted')
    assert not (tmp_path / 'e').exists() and not list(tmp_path.glob('.*.tmp'))


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path
