"""Every kind of bad input, through the real command-line tools: exit code 2, exactly one line on stderr that names the
problem, no traceback, and no output file created, half-written or overwritten.

Each case runs in its own process: a child of the fork server (tests/forkserver.py: the script's `__main__` block
with real stdio and a real exit code, without paying the torch import each time), and a few as plain
`python SCRIPT ...` subprocesses to show that the launch itself behaves the same.
"""
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, make_var, save_tiny_checkpoints
from tests.test_checkpoint_io import _CreatesFile
from tests.test_train import TINY_MODEL, TINY_RUN
from tests.test_train_tokenizer import TINY_VAE
from tests.train_helpers import make_image_folder, subprocess_env, tiny_tokenizer
from utils.checkpoint import load_file, save_atomic
from utils.loading import KIND_VAR, model_checkpoint

LOG_NAMES = ('stdout.txt', 'log.txt')   # logs a failing run may append to; everything else must stay as it was
SENTINEL = b'an earlier result that must survive'


@pytest.fixture(scope='module')
def p(tmp_path_factory, forkserver):
    """Every input the cases need (shared, never modified) under one folder."""
    root = tmp_path_factory.mktemp('inputs')
    ck = save_tiny_checkpoints(root / 'ckpts')
    viar = load_file(ck / 'ar.pth')
    var = make_var(patch_nums=(1, 2, 3, 4))
    save_atomic(model_checkpoint(KIND_VAR, var, vae_config=viar['vae_config']), root / 'var.pth')
    other = {**viar, 'model': {**viar['model'], 'head.weight': torch.zeros(7, 64)}}
    save_atomic(other, root / 'other_arch.pth')
    data = (ck / 'ar.pth').read_bytes()
    (root / 'truncated.pth').write_bytes(data[:len(data) // 2])
    torch.save({'model': viar['model'], 'payload': _CreatesFile(root / 'pwned.txt')}, root / 'evil.pth')

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

    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(root / 'good.npz', arr_0=good)
    np.savez(root / 'no_arr0.npz', images=good)
    np.savez(root / 'float.npz', arr_0=good.astype(np.float32) / 255)
    np.savez(root / 'gray.npz', arr_0=good[..., 0])
    np.savez(root / 'nchw.npz', arr_0=good.transpose(0, 3, 1, 2))
    np.savez(root / 'object.npz', arr_0=np.array([good[0], 'text'], dtype=object))
    (root / 'pngs').mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / 'pngs' / f'{i}.png')
    png = root / 'pngs' / '1.png'
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])  # the header reads, the pixels do not

    run_dir = root / 'run'  # a VIAR training run to resume
    child = forkserver.run('train.py', train_args(SimpleNamespace(images=images, tok=tok), run_dir, '--save_steps',
                                                  '2', '--max_steps', '2'), root / 'run_cli')
    assert child.returncode == 0, child.stderr
    run_ckpt = (run_dir / 'ar-ckpt-last.pth').read_bytes()
    (root / 'truncated_run.pth').write_bytes(run_ckpt[:len(run_ckpt) // 3])
    return SimpleNamespace(root=root, viar=ck / 'ar.pth', vae=ck / 'vae.pth', var=root / 'var.pth',
                           other_arch=root / 'other_arch.pth', truncated=root / 'truncated.pth',
                           evil=root / 'evil.pth', marker=root / 'pwned.txt', images=images, tok=tok,
                           empty=root / 'empty', no_classes=root / 'no_classes', empty_class=root / 'empty_class',
                           corrupt=root / 'corrupt', bad_image=bad, raw=root / 'raw', blocker=root / 'blocker',
                           good=root / 'good.npz', no_arr0=root / 'no_arr0.npz', float=root / 'float.npz',
                           gray=root / 'gray.npz', nchw=root / 'nchw.npz', object=root / 'object.npz',
                           pngs=root / 'pngs', run=run_dir, truncated_run=root / 'truncated_run.pth')


# ---- command lines (`p.out` is the case's own output folder) --------------------------------------------------------
def train_args(p, out, *extra, data=None):
    return ['--data_path', data or p.images, '--vae_ckpt', p.tok, '--out_dir', out, *TINY_MODEL, *TINY_RUN,
            '--workers', '0', '--max_steps', '4', *extra]


def tokenizer_args(p, out, *extra, data=None):
    return ['--data_path', data or p.images, '--out_dir', out, *TINY_VAE, '--bs', '4', '--workers', '0',
            '--max_steps', '2', '--no-progress', *extra]


def sampling_args(p, out, *extra, ckpt=None):
    return ['--ckpt', ckpt or p.viar, '--vae_ckpt', p.vae, '--sample_dir', out, '--name', 'run', '--per_class', '1',
            '--batch_size', '2', '--top_k', '10', '--schedule', 'const:2', *extra]


def gen_args(p, out, *extra, ckpt=None):
    return ['--ckpt', ckpt or p.viar, '--vae_ckpt', p.vae, '--out_dir', out, '--classes', '1', '--seeds', '0',
            '--top_k', '10', '--schedule', 'const:2', *extra]


def eval_args(p, out, *batches):
    return [*batches, '--device', 'cpu', '--no-progress']


T, TT, S, G, E, D = 'train.py', 'train_tokenizer.py', 'sampling.py', 'gen_img.py', 'evaluator.py', 'demo.py'
REAL = 'real'  # also launched as a plain `python SCRIPT ...` subprocess

# (case, script, argv from (inputs, output folder), fragment the error line must contain[, REAL])
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
    ('demo: no Fashion-MNIST files in --raw_dir', D,
     lambda p, o: ['--quick', '--raw_dir', p.raw, '--data', o / 'fm', '--out', o / 'demo'], '--raw_dir'),
    ('evaluator: truncated PNG in a folder', E, lambda p, o: eval_args(p, o, p.pngs, '--save-stats', o / 's.npz'),
     '1.png: cannot read this image'),
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
    # .npz batches
    ('.npz without arr_0', E, lambda p, o: eval_args(p, o, p.no_arr0, p.good), 'has no arr_0', REAL),
    ('.npz of float images', E, lambda p, o: eval_args(p, o, p.good, p.float), 'must hold uint8 images'),
    ('.npz without a channel axis', E, lambda p, o: eval_args(p, o, p.good, p.gray), 'must be RGB images of shape'),
    ('.npz in NCHW', E, lambda p, o: eval_args(p, o, p.nchw, p.good), 'looks like NCHW'),
    ('.npz holding pickled objects', E, lambda p, o: eval_args(p, o, p.good, p.object), 'must hold uint8 images'),
    # iteration schedules
    ('negative iterations', S, lambda p, o: sampling_args(p, o, '--schedule', 'const:-1'), 'non-negative'),
    ('negative entry in a list', G, lambda p, o: gen_args(p, o, '--schedule', 'list:1,2,-3,4'), 'non-negative'),
    ('zero-length list', S, lambda p, o: sampling_args(p, o, '--schedule', 'list:'), 'empty list'),
    ('wrong-length list', G, lambda p, o: gen_args(p, o, '--schedule', 'list:1,2'),
     'lists 2 iteration counts but the model has 4'),
    # sampling knobs
    ('class id out of range', S, lambda p, o: sampling_args(p, o, '--classes', '7'), 'out of range'),
    ('negative class id', G, lambda p, o: gen_args(p, o, '--classes', '-1'), 'out of range'),
    ('top-p above 1', S, lambda p, o: sampling_args(p, o, '--top_p', '1.5'), '--top_p must lie in [0, 1]'),
    ('top-p below 0', G, lambda p, o: gen_args(p, o, '--top_p', '-0.1'), '--top_p must lie in [0, 1]'),
    # batch size 0
    ('sampling: batch size 0', S, lambda p, o: sampling_args(p, o, '--batch_size', '0'), 'must be positive'),
    ('gen_img: batch size 0', G, lambda p, o: gen_args(p, o, '--batch_size', '0'), '--batch_size must be positive'),
    ('train: batch size 0', T, lambda p, o: train_args(p, o, '--bs', '0'), '--bs (0)'),
    ('tokenizer: batch size 0', TT, lambda p, o: tokenizer_args(p, o, '--bs', '0'), '--bs (0)'),
    ('evaluator: batch size 0', E, lambda p, o: eval_args(p, o, p.good, p.good, '--batch-size', '0'),
     '--batch-size must be >= 1'),
    # unwritable outputs
    ('sampling: unwritable --sample_dir', S, lambda p, o: sampling_args(p, p.blocker / 'sub'),
     '--sample_dir: ' + 'BLOCKER/sub is not a writable folder'),
    ('gen_img: unwritable --out_dir', G, lambda p, o: gen_args(p, p.blocker / 'sub'), 'is not a writable folder'),
    ('train: unwritable --out_dir', T, lambda p, o: train_args(p, p.blocker / 'sub'), 'is not writable'),
    ('tokenizer: unwritable --out_dir', TT, lambda p, o: tokenizer_args(p, p.blocker / 'sub'), 'is not writable'),
    ('demo: unwritable --out', D, lambda p, o: ['--quick', '--out', p.blocker / 'sub'], 'is not a writable folder'),
    ('evaluator: --save-stats into a missing folder', E,
     lambda p, o: eval_args(p, o, p.good, '--save-stats', o / 'nope' / 's.npz'), 'does not exist'),
]


def snapshot(*folders: Path) -> dict:
    """Every file's bytes, logs aside."""
    return {f: f.read_bytes() for folder in folders for f in sorted(folder.rglob('*'))
            if f.is_file() and f.name not in LOG_NAMES and not f.name.startswith('events.out.tfevents')}


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_touches_nothing(case, p, forkserver, tmp_path):
    name, script, argv, fragment, *real = case
    out = tmp_path / 'out'
    if script == T:  # an earlier training run in the output folder, which --resume auto picks up
        shutil.copytree(p.run, out)
    else:  # an earlier result in the output folder, under the names the tool writes
        out.mkdir()
        for file in ('run.npz', 'class1_seed0.png', 's.npz'):
            (out / file).write_bytes(SENTINEL)
    argv = [str(a) for a in argv(p, out)]
    fragment = fragment.replace('BLOCKER', str(p.blocker))
    before = snapshot(p.root, out)
    launches = [('fork', forkserver.run(script, argv, tmp_path / 'cli'))]
    if real:
        launches.append(('subprocess', subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=subprocess_env(),
                                                      capture_output=True, text=True, timeout=240)))
    for how, proc in launches:
        stdout = proc.stdout
        stderr = proc.stderr
        lines = stderr.splitlines()
        assert proc.returncode == 2, (how, proc.returncode, stderr[-3000:])
        assert len(lines) == 1 and lines[0].startswith(f'{script}: error: ') and fragment in lines[0], (how, stderr)
        assert 'Traceback' not in stderr + stdout, how
    assert snapshot(p.root, out) == before
    assert not p.marker.exists()


def test_odd_image_modes_train(p, forkserver, tmp_path):
    """Greyscale, RGBA and 16-bit files (make_image_folder mixes them in) are converted, not refused."""
    modes = {Image.open(f).mode for f in p.images.rglob('*.png')}
    assert {'L', 'RGBA', 'I;16'} <= modes, modes
    child = forkserver.run(T, train_args(p, tmp_path / 'out', '--max_steps', '2'), tmp_path / 'cli')
    assert child.returncode == 0, child.stderr
