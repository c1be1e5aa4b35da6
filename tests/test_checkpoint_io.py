"""Checkpoint I/O: safe loading, readable strict-load errors, atomic and safetensors writes."""
import collections
import os

import pytest
import torch

from tests.tiny import make_var
from utils.checkpoint import CheckpointError, load_file, load_state_dict_strict, save_atomic, save_safetensors


class Payload:
    """An arbitrary Python object: loading it would need full unpickling."""


def test_missing_empty_and_truncated(tmp_path):
    with pytest.raises(CheckpointError, match='not found: .*nope.pth'):
        load_file(tmp_path / 'nope.pth')
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        load_file(tmp_path / 'empty.pth')
    good = tmp_path / 'good.pth'
    save_atomic(make_var().state_dict(), good)
    data = good.read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_file(tmp_path / 'cut.pth')
    (tmp_path / 'cut.safetensors').write_bytes(b'\x10\x00\x00\x00garbage')
    with pytest.raises(CheckpointError, match='safetensors'):
        load_file(tmp_path / 'cut.safetensors')


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': Payload()}, path)
    with pytest.raises(CheckpointError, match='arbitrary code'):
        load_file(path)


def test_round_trips(tmp_path):
    var = make_var()
    sd = var.state_dict()
    save_atomic({'model': sd, 'step': 3, 'config': var.config.to_dict()}, tmp_path / 'a.pth')
    loaded = load_file(tmp_path / 'a.pth')
    assert loaded['step'] == 3 and loaded['config']['depth'] == 2
    save_safetensors(sd, tmp_path / 'a.safetensors')
    st = load_file(tmp_path / 'a.safetensors')
    assert set(st) == set(sd) and all(torch.equal(st[k], sd[k]) for k in sd)
    assert sorted(os.listdir(tmp_path)) == ['a.pth', 'a.safetensors']  # no temp files left behind


def test_strict_load_names_the_problem():
    var, viar = make_var(), make_var(use_implicit=True, pre_depth=1, post_depth=1)
    with pytest.raises(CheckpointError, match='VIAR checkpoint'):
        load_state_dict_strict(var, viar.state_dict(), 'viar.pth')
    with pytest.raises(CheckpointError, match='explicit VAR checkpoint'):
        load_state_dict_strict(viar, var.state_dict(), 'var.pth')
    wide = make_var(embed_dim=128)
    with pytest.raises(CheckpointError, match=r'shape mismatch: .*\(128, 8\) vs model \(64, 8\)'):
        load_state_dict_strict(var, wide.state_dict(), 'wide.pth')
    # DDP / torch.compile prefixes are stripped.
    prefixed = collections.OrderedDict(('module._orig_mod.' + k, v) for k, v in make_var(seed=3).state_dict().items())
    load_state_dict_strict(var, prefixed)
    assert torch.equal(var.head.weight, make_var(seed=3).head.weight)


def test_failed_atomic_write_keeps_old_file(tmp_path):
    path = tmp_path / 'ckpt.pth'
    save_atomic({'v': torch.ones(2)}, path)
    with pytest.raises(Exception):
        save_atomic({'bad': lambda: 0}, path)  # lambdas cannot be pickled: the write fails midway
    assert torch.equal(load_file(path)['v'], torch.ones(2))
    assert os.listdir(tmp_path) == ['ckpt.pth']


class _CreatesFile:
    """Unpickling this object would create a file (a stand-in for any code a stranger's checkpoint could run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / 'pwned.txt'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'payload': _CreatesFile(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match='refused'):
        load_file(evil)
    assert not marker.exists()
    # The same payload under the official layout and through load_models is refused too.
    from utils.model_checkpoints import load_models
    with pytest.raises(CheckpointError, match='refused'):
        load_models(evil, evil)
    assert not marker.exists()
