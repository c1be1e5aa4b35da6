"""Training infrastructure against closed forms: lr/wd schedules, weight-decay groups, AMP (accumulation, clipping,
the official GradScaler quirks), the distributed sampler, image conversion, RNG state and checkpoint files."""
import argparse
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import make_var
from tests.train_helpers import make_image_folder
from training import train_cli
from training.amp import SCALER_MAX, AmpOptimizer
from training.ar_trainer import ARTrainer
from training.checkpoints import CheckpointFiles
from training.data import BadImageError, DistributedBatchSampler, build_datasets, load_rgb, make_loader, to_rgb
from training.flags import derive_plan
from training.optim import Schedule, lr_factor, param_groups, weight_decay_at
from training.seeds import mix_seed, rng_state, set_rng_state
from utils.cli import ArgumentParser


# ---- schedules ------------------------------------------------------------------------------------------------------
def test_lin0_schedule_closed_form():
    wp, max_it, wp0, wpe = 100, 1100, 0.005, 0.01
    f = lambda it: lr_factor(it, wp, max_it, 'lin0', wp0, wpe)  # noqa: E731
    assert f(0) == wp0 and f(50) == pytest.approx(wp0 + (1 - wp0) * 0.5)
    assert f(100) == 1.0 and f(100 + 49) == 1.0          # flat for the first 5% after warmup (999 it)
    assert f(max_it - 1) == pytest.approx(wpe)           # linear down to wpe at the last iteration
    mid = 100 + round(0.5 * 999)
    pasd = (mid - wp) / (max_it - 1 - wp)
    assert f(mid) == pytest.approx(wpe + (1 - wpe) * (1 - pasd) / 0.95)
    for sched in ('cos', 'lin', 'lin00', 'exp'):
        assert lr_factor(max_it - 1, wp, max_it, sched, wp0, wpe) == pytest.approx(wpe)
        assert lr_factor(wp, wp, max_it, sched, wp0, wpe) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        Schedule(1.0, 0, 10, schedule='lin7')


def test_constant_lr_and_absolute_peak_lr():
    # VARiant fine-tunes a trained VAR at a constant 1e-6 without warmup: --sche const --tlr 1e-6.
    parse = lambda *a: train_cli.get_parser().parse_args(['--data_path', 'x', *a])  # noqa: E731
    plan = derive_plan(parse('--sche', 'const', '--tlr', '1e-6', '--bs', '1024', '--ep', '25'), 8, 10240,
                             'cpu')
    assert plan.peak_lr == 1e-6 and plan.warmup_iters == 0          # the paper's 1e-6, no warmup
    assert all(lr_factor(it, 0, plan.max_iters, 'const') == 1.0 for it in (0, 1, plan.max_iters - 1))
    assert derive_plan(parse('--sche', 'const', '--wp', '1', '--ep', '25'), 1, 768, 'cpu').warmup_iters == 1
    assert derive_plan(parse('--bs', '512'), 1, 512, 'cpu').peak_lr == pytest.approx(2e-4)  # tblr x 512/256


def test_weight_decay_ramp_and_exclusions():
    assert weight_decay_at(0, 1001, 0.05, 0.08) == pytest.approx(0.05)
    assert weight_decay_at(500, 1001, 0.05, 0.08) == pytest.approx(0.065)
    assert weight_decay_at(1000, 1001, 0.05, 0.08) == pytest.approx(0.08)
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1)
    groups, counts = param_groups(var)
    by_id = {id(p): g['wd_sc'] for g in groups for p in g['params']}
    wd = {name: by_id[id(p)] for name, p in var.named_parameters()}
    for name in ('pos_1LC', 'pos_start', 'lvl_embed.weight', 'pre_blocks.0.attn.scale_mul_1H11',
                 'pre_blocks.0.attn.q_bias', 'head.bias', 'implicit_block_projection.0.bias'):
        assert wd[name] == 0.0, name
    for name in ('class_emb.weight', 'word_embed.weight', 'head.weight', 'implicit_block.ada_lin.1.weight',
                 'implicit_block_projection.0.weight', 'post_blocks.0.ffn.fc1.weight'):
        assert wd[name] == 1.0, name
    assert counts['decay'] + counts['no_decay'] == sum(p.numel() for p in var.parameters())
    opt = torch.optim.AdamW(groups)
    Schedule(2.0, 0, 10, wd=0.05, wd_end=0.08).apply(opt, 0)
    assert [g['weight_decay'] for g in opt.param_groups] == [0.05, 0.0] and opt.param_groups[1]['lr'] == 2.0


# ---- AMP ------------------------------------------------------------------------------------------------------------
def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def test_accumulation_matches_one_big_batch():
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    big, opt = _toy()
    AmpOptimizer(big, opt, grad_clip=0).backward_step(((big(x) - y) ** 2).mean(), stepping=True)
    small, opt2 = _toy()
    amp = AmpOptimizer(small, opt2, grad_clip=0, accum=2)
    assert amp.backward_step(((small(x[:4]) - y[:4]) ** 2).mean(), stepping=False) is None
    amp.backward_step(((small(x[4:]) - y[4:]) ** 2).mean(), stepping=True)
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipping_reports_the_pre_clip_norm():
    model, opt = _toy()
    amp = AmpOptimizer(model, opt, grad_clip=0.01)
    loss = model(torch.randn(8, 4)).sum() * 100
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    norm, scale = amp.backward_step(loss, stepping=True)
    assert scale is None and norm.item() == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item())
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


def test_fp16_falls_back_to_fp32_on_cpu_and_scaler_quirks():
    model, opt = _toy()
    amp = AmpOptimizer(model, opt, precision='fp16')
    assert amp.precision == 'fp32' and amp.scaler is None
    # The quirks themselves, on a CPU GradScaler: cap at 2^15, VIAR's reset of a collapsed scale.
    amp.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16, growth_interval=1000)
    x = torch.randn(8, 4)
    assert amp.backward_step(model(x).mean(), stepping=True)[1] == math.log2(SCALER_MAX)
    state = amp.scaler.state_dict()
    amp.scaler.load_state_dict({**state, 'scale': 1e-5})
    amp.backward_step(model(x).mean(), stepping=True)
    assert amp.scaler.get_scale() == pytest.approx(0.8 * 2 ** 11)
    assert amp.scaler.state_dict()['growth_interval'] == 2000
    amp.scaler.load_state_dict({**amp.scaler.state_dict(), 'scale': 1e-5})
    amp.backward_step(model(x).mean() * float('inf'), stepping=True)  # overflow: reset, then halved
    assert amp.scaler.get_scale() == pytest.approx(0.8 * 0.8 * 2 ** 11 / 2)
    amp2 = AmpOptimizer(*_toy())
    amp2.load_state_dict(amp.state_dict())
    assert amp2.reset_scale == pytest.approx(0.64 * 2 ** 11)


# ---- data -----------------------------------------------------------------------------------------------------------
def _batches(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_sampler_is_world_size_invariant_and_resumable():
    one = DistributedBatchSampler(10, 4, seed=3)
    two = [DistributedBatchSampler(10, 4, rank=r, world=2, seed=3) for r in range(2)]
    assert one.batches_per_epoch == len(one) == 3
    b1 = _batches(one, 5)
    b2 = [_batches(s, 5) for s in two]
    assert [b2[0][k] + b2[1][k] for k in range(3)] == b1            # same images and seeds per global batch
    assert sorted({i for b in b1 for i, _ in b}) == list(range(10))  # padded with its own head: everything seen
    assert _batches(one, 5, start=2) == b1[2:]                       # resuming mid-epoch
    assert _batches(one, 6) != b1                                    # reshuffled every epoch
    assert _batches(DistributedBatchSampler(10, 4, seed=4), 5) != b1
    for n, lengths in ((7, [2, 2]), (5, [2, 1])):  # evaluation: every image exactly once
        val = [DistributedBatchSampler(n, 4, rank=r, world=2, shuffle=False, pad=False) for r in range(2)]
        seen = sorted(i for s in val for b in _batches(s, 0) for i, _ in b)
        assert seen == list(range(n)) and [len(s) for s in val] == lengths == [len(_batches(s, 0)) for s in val]


def test_augmentation_independent_of_workers(tmp_path):
    train, _ = build_datasets(make_image_folder(tmp_path, train_per_class=3, val_per_class=1), 16, hflip=True)
    sampler = DistributedBatchSampler(len(train), 4, seed=1)
    sampler.set_epoch(2)
    main = [x for x, _ in make_loader(train, sampler, 0, False)]
    workers = [x for x, _ in make_loader(train, sampler, 2, False)]
    assert all(torch.equal(a, b) for a, b in zip(main, workers)) and len(main) == 3
    assert main[0].shape == (4, 3, 16, 16) and main[0].min() >= -1 and main[0].max() <= 1


def test_image_modes_become_rgb(tmp_path):
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(grey16).getpixel((0, 0)) == (255, 255, 255)         # rescaled, not clipped
    assert to_rgb(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))).getpixel((0, 0)) == (128, 128, 128)
    rgba = Image.new('RGBA', (4, 4), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)           # transparent -> white
    assert to_rgb(Image.new('LA', (2, 2), (0, 255))).getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(Image.new('F', (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    pal = Image.new('P', (2, 2))
    assert to_rgb(pal).mode == 'RGB' and to_rgb(Image.new('CMYK', (2, 2))).mode == 'RGB'
    path = tmp_path / 'x.png'
    Image.new('RGB', (8, 8), (1, 2, 3)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BadImageError, match=f'cannot read image {path}'):
        load_rgb(str(path))
    wrapped = f'Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n' \
              f'  File "x.py", line 1\ntraining.data.BadImageError: cannot read image {path}: truncated\n'
    assert str(BadImageError(wrapped)) == f'cannot read image {path}: truncated'


# ---- run plumbing ---------------------------------------------------------------------------------------------------
def test_official_bool_spelling():
    p = ArgumentParser()
    p.add_argument('--use_implicit', action=argparse.BooleanOptionalAction)
    p.add_argument('--saln', '--shared_aln', action=argparse.BooleanOptionalAction, default=True)
    assert p.parse_args(['--use_implicit=True']).use_implicit is True
    assert p.parse_args(['--use_implicit=False', '--shared_aln=0']).use_implicit is False
    assert p.parse_args(['--shared_aln=0']).saln is False and p.parse_args([]).use_implicit is None


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    gen = random.Random(5)
    files = CheckpointFiles(tmp_path, 'x')
    files.save({'it': 1, 'rng': [rng_state({'g': gen})], 'model': {}}, is_best=True)
    draw = lambda: (torch.rand(3), random.random(), np.random.rand(), gen.random())  # noqa: E731
    first = draw()
    set_rng_state(torch.load(files.last, weights_only=True)['rng'][0], {'g': gen})
    again = draw()
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    # best is a link to the last file at save time: a later `last` does not change it.
    files.save({'it': 2, 'rng': [], 'model': {}}, is_best=False)
    assert torch.load(files.best, weights_only=True)['rng'] and not torch.load(files.last, weights_only=True)['rng']
    assert mix_seed(1, 2) != mix_seed(2, 1) and mix_seed(1, 2) == mix_seed(1, 2)


def test_sjfb_draws_are_the_trainers_and_resume_from_its_checkpoint(tmp_path):
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1, no_grad_iters_range=(0, 4), grad_iters_range=(1, 3))
    trainer = ARTrainer(var, None, None, None, 0.0, sjfb_seed=123)
    draws = [trainer.draw_sjfb_iters() for _ in range(50)]
    assert {n for n, _ in draws} == set(range(5)) and {g for _, g in draws} == {1, 2, 3}
    same, other = (ARTrainer(var, None, None, None, 0.0, sjfb_seed=seed) for seed in (123, 124))
    assert [same.draw_sjfb_iters() for _ in range(50)] == draws != [other.draw_sjfb_iters() for _ in range(50)]
    # Its generator is one of the RNG streams a checkpoint holds: a resumed trainer continues the same draws.
    files = CheckpointFiles(tmp_path, 'x')
    files.save({'it': 1, 'rng': [rng_state(trainer.rng_generators)], 'model': {}}, is_best=True)
    ahead = [trainer.draw_sjfb_iters() for _ in range(20)]
    resumed = ARTrainer(var, None, None, None, 0.0, sjfb_seed=999)
    set_rng_state(torch.load(files.last, weights_only=True)['rng'][0], resumed.rng_generators)
    assert [resumed.draw_sjfb_iters() for _ in range(20)] == ahead
    assert ARTrainer(make_var(), None, None, None, 0.0).draw_sjfb_iters() is None  # VAR draws nothing
