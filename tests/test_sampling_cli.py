"""sampling.py end to end on the CPU: sharding over torchrun, resuming after a kill, and one-line errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import ROOT, save_tiny_checkpoints

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp('ckpts'))


def _args(ckpts, out, *extra):
    return ['--ckpt', str(ckpts / 'ar.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'), '--sample_dir', str(out),
            '--per_class', '3', '--batch_size', '4', '--top_k', '10', '--schedule', 'linear:3,1', '--name', 'run',
            *extra]


def _sample(args, nproc=1, check=True):
    launcher = [sys.executable, 'sampling.py'] if nproc == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'sampling.py']
    return subprocess.run(launcher + args, cwd=ROOT, env=ENV, capture_output=True, text=True, check=check)


def _npz(out):
    with np.load(Path(out) / 'run.npz') as f:
        return f['arr_0']


@pytest.fixture(scope='module')
def reference(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp('one')
    _sample(_args(ckpts, out))
    return _npz(out)


def test_one_process_npz(reference):
    assert reference.shape == (15, 8, 8, 3) and reference.dtype == np.uint8  # 3 per class x 5 classes
    assert len({img.tobytes() for img in reference}) == 15  # all distinct


def test_two_processes_match_one(ckpts, reference, tmp_path):
    _sample(_args(ckpts, tmp_path), nproc=2)
    assert np.array_equal(_npz(tmp_path), reference)


def test_a_finished_run_keeps_its_npz_until_an_image_changes(ckpts, reference, tmp_path):
    _sample(_args(ckpts, tmp_path))
    npz = tmp_path / 'run.npz'
    packed = npz.stat().st_mtime_ns
    rerun = _sample(_args(ckpts, tmp_path))
    assert npz.stat().st_mtime_ns == packed and 'kept as it is' in rerun.stdout   # its activation caches stay valid
    png = tmp_path / 'run' / '000004.png'
    os.utime(png, ns=(packed + 10**9, packed + 10**9))     # an image replaced after the packing
    _sample(_args(ckpts, tmp_path))
    assert npz.stat().st_mtime_ns > packed and np.array_equal(_npz(tmp_path), reference)


def test_resume_after_kill(ckpts, reference, tmp_path):
    # Slow it down (1 image per batch, 8 iterations) so the kill lands mid-run, then resume.
    args = _args(ckpts, tmp_path, '--batch_size', '1', '--schedule', 'const:8')
    proc = subprocess.Popen([sys.executable, 'sampling.py'] + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir = tmp_path / 'run'
    deadline = time.time() + 60
    while time.time() < deadline and len(list(run_dir.glob('*.png'))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list(run_dir.glob('*.png')))
    assert 4 <= partial < 15, 'the kill did not land mid-run'
    assert not (tmp_path / 'run.npz').exists()
    _sample(args)
    full = tmp_path / 'full'
    _sample(_args(ckpts, full, '--batch_size', '1', '--schedule', 'const:8'))
    assert np.array_equal(_npz(tmp_path), _npz(full))
    assert not list(run_dir.glob('.*.tmp'))


@pytest.mark.parametrize('extra,message', [
    (['--classes', '3,9'], 'out of range'),
    (['--top_p', '1.5'], 'top_p'),
    (['--batch_size', '0'], '--batch_size: must be a positive integer'),
    (['--schedule', 'list:1,2'], 'scales'),
    (['--schedule', 'const:-1'], 'non-negative'),
    (['--no-use_implicit'], 'VIAR'),
])
def test_bad_input_one_line(ckpts, tmp_path, extra, message):
    r = _sample(_args(ckpts, tmp_path, *extra), check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and 'Traceback' not in r.stderr, r.stderr


def test_missing_checkpoint_and_conflicting_run(ckpts, tmp_path):
    r = _sample(['--ckpt', str(tmp_path / 'nope.pth'), '--vae_ckpt', str(ckpts / 'vae.pth')], check=False)
    assert r.returncode == 2 and 'checkpoint not found' in r.stderr and 'nope.pth' in r.stderr
    _sample(_args(ckpts, tmp_path, '--classes', '0'))
    r = _sample(_args(ckpts, tmp_path, '--classes', '0', '--cfg', '2.0'), check=False)
    assert r.returncode == 2 and 'other settings (cfg)' in r.stderr


def test_run_from_before_a_config_rename_resumes(ckpts, reference, tmp_path):
    """A run folder whose .json stores the model under older field names is the same run, not a conflict."""
    import json
    from models import VARConfig
    _sample(_args(ckpts, tmp_path))
    meta_path = tmp_path / 'run.json'
    meta = json.loads(meta_path.read_text())
    renamed = {new: old for old, new in VARConfig.RENAMED_FIELDS.items()}
    meta['knobs']['model'] = {renamed.get(k, k): v for k, v in meta['knobs']['model'].items()}
    assert set(meta['knobs']['model']) & set(VARConfig.RENAMED_FIELDS)
    meta_path.write_text(json.dumps(meta))
    (tmp_path / 'run.npz').unlink()
    _sample(_args(ckpts, tmp_path))
    assert np.array_equal(_npz(tmp_path), reference)
    meta['knobs']['model']['depth'] += 1   # a real difference is still refused
    meta_path.write_text(json.dumps(meta))
    r = _sample(_args(ckpts, tmp_path), check=False)
    assert r.returncode == 2 and 'other settings (model)' in r.stderr
