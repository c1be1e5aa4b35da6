"""train.py end to end on tiny configs: 2-rank DDP vs 1 rank, killed-and-resumed runs, constant S-JFB memory, the
paper's command, token cache, export, and the one-line errors."""
import logging
import multiprocessing
import os
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.train_memory import fake_batch, saved_bytes
from models import VARConfig, VQVAEConfig, build_var, num_params
from tests.tiny import ROOT, make_var
from tests.train_helpers import (SUBPROCESS_TIMEOUT, data_args, kill_tree, launch, load_weights, make_image_folder,
                                 read_log, run_cli, subprocess_env)
from training import train_cli
from training.data import build_datasets, build_transform
from training.flags import derive_plan
from utils.checkpoint import save_atomic
from utils.cli import run
from utils.export import export
from utils.model_checkpoints import KIND_VAR, load_models, load_vae, model_checkpoint

from tests.train_helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures('one_thread')

TINY_MODEL = ['--depth', '2', '--embed_dim', '64', '--num_heads', '2', '--use_implicit', '--p_depth', '1',
              '--no_grad_iters_range', '0', '3', '--grad_iters_range', '1', '3']
TINY_RUN = ['--bs', '8', '--ep', '20', '--tblr', '0.05', '--log_freq', '1', '--no-progress']
# Nothing random that depends on how the batch is split over ranks: the 1- and 2-rank runs must agree.
DETERMINISTIC = ['--cond_drop_rate', '0', '--drop_path_rate', '0', '--sjfb_shared_draws', '--workers', '0']
# Every random draw on: label dropout, drop path, per-rank S-JFB counts, flips, a data worker.
STOCHASTIC = ['--hflip', '--workers', '1', '--save_freq', '2']
PAPER_VIAR_PARAMS = 770_884_426
IMAGENET_TRAIN_IMAGES = 1_281_167


def train_args(data, out_dir, *extra):
    return data_args(data, out_dir, *TINY_MODEL, *TINY_RUN, *extra)


def test_two_ranks_match_one_rank(data, tmp_path):
    steps = ['--max_steps', '6']
    run_cli('train.py', train_args(data, tmp_path / 'two', *DETERMINISTIC, *steps), nproc=2)
    run_cli('train.py', train_args(data, tmp_path / 'one', *DETERMINISTIC, *steps), nproc=1)
    # Every rank hashed its weights at the save and all digests agreed (the run raises otherwise).
    assert 'identical on 2 rank(s)' in (tmp_path / 'two' / 'stdout.txt').read_text()
    losses = [r['train/L_mean'] for r in read_log(tmp_path / 'two') if 'train/L_mean' in r]
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses
    one, two = load_weights(tmp_path / 'one' / 'ar-ckpt-last.pth'), load_weights(tmp_path / 'two' / 'ar-ckpt-last.pth')
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    start = train_cli.build_var_config(train_cli.get_parser().parse_args(train_args(data, tmp_path)), 3,
                                   load_vae(data[1]).config)
    assert any((one[k] - v).abs().max() > 1e-3 for k, v in build_var(start).state_dict().items())  # it trained


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = SUBPROCESS_TIMEOUT):
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and text in path.read_text():
            return
        assert proc.poll() is None, f'the run ended early (exit {proc.returncode})'
        time.sleep(0.02)
    raise TimeoutError(f'{text!r} never appeared in {path}')


def test_killed_run_resumes_bit_exactly(data, tmp_path):
    total = 12
    run_cli('train.py', train_args(data, tmp_path / 'straight', *STOCHASTIC, '--max_steps', str(total)), nproc=2)

    out = tmp_path / 'killed'
    proc = subprocess.Popen(launch('train.py', train_args(data, out, *STOCHASTIC, '--save_steps', '4'), nproc=2),
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / 'stdout.txt', 'saved', proc)
    finally:
        kill_tree(proc.pid)  # the launcher and both ranks, mid-training
        proc.wait()
    killed_at = torch.load(out / 'ar-ckpt-last.pth', weights_only=True)['it']
    assert 4 <= killed_at < total

    run_cli('train.py', train_args(data, out, *STOCHASTIC, '--max_steps', str(total)), nproc=2)
    assert f'resumed from {out / f"ar-ckpt-{killed_at:08d}.pth"} at iteration {killed_at}' in \
        (out / 'stdout.txt').read_text()
    straight, resumed = load_weights(tmp_path / 'straight' / 'ar-ckpt-last.pth'), load_weights(out / 'ar-ckpt-last.pth')
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # The curves continue: one log entry per iteration, none duplicated by the restart.
    steps = [r['step'] for r in read_log(out) if 'train/L_mean' in r]
    assert steps == list(range(1, total + 1))


def test_sjfb_memory_constant_in_no_grad_linear_in_grad():
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1).train()
    batch = fake_batch(var, 2, 'cpu')
    saved = {(ng, g): saved_bytes(var, *batch, (ng, g)).retained for ng in (0, 10) for g in (1, 2, 3, 4)}
    for g in (1, 2, 3, 4):
        assert saved[(0, g)] == saved[(10, g)], g
    steps = {saved[(0, g + 1)] - saved[(0, g)] for g in (1, 2, 3)}
    assert len(steps) == 1 and steps.pop() > 0


def test_paper_command_builds_viar_770m():
    cmd = subprocess.run(['bash', str(ROOT / 'scripts' / 'train.sh'), '--data_path', '/data/imagenet'],
                         env={**os.environ, 'DRY_RUN': '1', 'NPROC': '8'}, capture_output=True, text=True,
                         check=True).stdout
    argv = shlex.split(cmd)
    assert '--nproc_per_node=8' in argv and '--nnodes=1' in argv
    args = train_cli.get_parser().parse_args(argv[argv.index('train.py') + 1:])
    assert (args.batch_size, args.epochs, args.base_lr, args.precision) == (512, 550, 8e-5, 'fp16')
    assert (args.init_adaln_gamma, args.lr_end, args.weight_decay_end, args.use_implicit) == (1e-5, 0.01, 0.08, True)
    config = train_cli.build_var_config(args, 1000, VQVAEConfig())
    assert (config.depth, config.pre_depth, config.post_depth, config.init_adaln_gamma) == (30, 5, 5, 1e-5)
    assert num_params(build_var(config, 'meta')) == PAPER_VIAR_PARAMS
    # REFERENCE section 4: 8 GPUs x 64 images, peak lr 1.6e-4, 2503 it/epoch, 11 warmup epochs.
    plan = derive_plan(args, 8, IMAGENET_TRAIN_IMAGES, 'cuda')
    assert (plan.local_batch, plan.iters_per_epoch, plan.max_iters, plan.warmup_iters) == (64, 2503, 1_376_650,
                                                                                           27_533)
    assert plan.peak_lr == pytest.approx(1.6e-4) and plan.precision == 'fp16'


def test_explicit_flags_build_the_paper_viar():
    args = train_cli.get_parser().parse_args(['--data_path', 'x', '--depth', '30', '--use_implicit', '--pre_depth', '5',
                                          '--post_depth', '5'])
    assert num_params(build_var(train_cli.build_var_config(args, 1000, VQVAEConfig()), 'meta')) == PAPER_VIAR_PARAMS
    # A preset with a different depth re-derives width and heads; official bool spelling works.
    args = train_cli.get_parser().parse_args(['--data_path', 'x', '--preset', 'var-d16', '--depth', '20',
                                          '--use_implicit=False'])
    config = train_cli.build_var_config(args, 1000, VQVAEConfig())
    assert (config.embed_dim, config.num_heads, config.use_implicit) == (1280, 20, False)
    # The activation: the official tanh GELU unless --mlp_act asks for the exact one.
    assert config.mlp_act == 'gelu_tanh'
    args = train_cli.get_parser().parse_args(['--data_path', 'x', '--preset', 'viar-demo', '--mlp_act', 'gelu'])
    assert train_cli.build_var_config(args, 10, VQVAEConfig()).mlp_act == 'gelu'


def test_token_cache_export_and_val(data, tmp_path, capsys):
    images, vae_path = data
    cache = tmp_path / 'cache'
    args = train_args(data, tmp_path / 'out', '--workers', '0', '--token_cache', str(cache), '--max_steps', '3',
                      '--ep', '1', '--save_freq', '1')
    assert run(train_cli.main, train_cli.get_parser(), args) == 0
    # The cache holds the tokens of every training image's centre crop.
    meta = next(cache.glob('tokens-*.json'))
    cached, labels = np.load(meta.with_suffix('.npy')), np.load(meta.with_suffix('.labels.npy'))
    vae = load_vae(vae_path)
    folder = build_datasets(images, 16)[0]
    img = build_transform(16, train=False)(folder.loader(folder.samples[5][0]))
    assert np.array_equal(cached[5, 0], torch.cat(vae.img_to_idxBl(img[None]), 1)[0].numpy())
    assert labels.tolist() == folder.targets
    log = (tmp_path / 'out' / 'stdout.txt').read_text()
    assert 'val after epoch 1' in log and (tmp_path / 'out' / 'ar-ckpt-best.pth').is_file()
    # Reused on the next run; the checkpoint alone rebuilds both models; export gives the released format.
    assert run(train_cli.main, train_cli.get_parser(), [*args, '--out_dir', str(tmp_path / 'again')]) == 0
    assert 'token cache: using' in (tmp_path / 'again' / 'stdout.txt').read_text()
    ckpt = tmp_path / 'out' / 'ar-ckpt-best.pth'
    vae2, var = load_models(ckpt, vae_path)
    pth, st = export(ckpt, tmp_path / 'export', 'mine')
    bare = torch.load(pth, weights_only=True)
    assert set(bare) == set(var.state_dict()) and all(isinstance(v, torch.Tensor) for v in bare.values())
    for path in (pth, st):
        _, var3 = load_models(path, vae_path)  # architecture read off the keys, strict load
        assert all(torch.equal(a, b) for a, b in zip(var.state_dict().values(), var3.state_dict().values()))


def test_export_warns_of_an_activation_the_bare_weights_cannot_carry(tmp_path, caplog):
    config = VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=3, patch_nums=(1, 2), vocab_size=16, Cvae=8)
    for mlp_act, warned in (('gelu_tanh', False), ('gelu', True)):
        ckpt = tmp_path / f'{mlp_act}.pth'
        save_atomic(model_checkpoint(KIND_VAR, build_var(config.replace(mlp_act=mlp_act))), ckpt)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger='viar'):
            export(ckpt, tmp_path / 'export')
        assert ("mlp_act='gelu', which the bare weights do not record" in caplog.text) == warned, caplog.text


def _fails(args, capsys, match):
    assert run(train_cli.main, train_cli.get_parser(), args) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and match in err, err
    return err


def test_one_line_errors(data, tmp_path, capsys):
    images, vae = data
    out = ['--out_dir', str(tmp_path / 'out'), *TINY_MODEL, *TINY_RUN, '--workers', '0', '--max_steps', '1']
    _fails(['--data_path', str(tmp_path / 'nope'), '--vae_ckpt', str(vae), *out], capsys, 'does not exist')
    (tmp_path / 'no_train').mkdir()
    _fails(['--data_path', str(tmp_path / 'no_train'), '--vae_ckpt', str(vae), *out], capsys, 'has no train/ folder')
    (tmp_path / 'no_train' / 'train').mkdir()
    _fails(['--data_path', str(tmp_path / 'no_train'), '--vae_ckpt', str(vae), *out], capsys, 'holds no class folders')
    empty = tmp_path / 'empty'
    (empty / 'train' / 'a').mkdir(parents=True)
    (empty / 'train' / 'b').mkdir()
    (empty / 'train' / 'a' / 'x.png').write_bytes((images / 'train' / 'class1' / '1.png').read_bytes())
    _fails(['--data_path', str(empty), '--vae_ckpt', str(vae), *out], capsys, f'{empty / "train" / "b"} has no images')
    _fails(['--data_path', str(images), '--vae_ckpt', str(tmp_path / 'missing.pth'), *out], capsys,
           'tokenizer checkpoint not found')
    _fails([*train_args(data, tmp_path / 'out'), '--bs', '0'], capsys,
           'argument --batch_size/--bs: must be a positive integer')
    (tmp_path / 'file').write_text('x')
    _fails(train_args(data, tmp_path / 'file' / 'sub'), capsys, 'is not a writable folder')
    _fails([*train_args(data, tmp_path / 'nan'), '--workers', '0', '--tblr', '1e12', '--grad_clip', '0',
            '--max_steps', '6'], capsys, 'the loss is nan at iteration 2')
    # Resuming with flags that describe another model.
    assert run(train_cli.main, train_cli.get_parser(), [*train_args(data, tmp_path / 'r'), '--workers', '0',
                                                '--max_steps', '1']) == 0
    capsys.readouterr()
    _fails([*train_args(data, tmp_path / 'r'), '--workers', '0', '--max_steps', '2', '--p_depth', '2', '--depth', '3'],
           capsys, 'was trained with depth=2')


def test_corrupt_image_is_named_or_skipped(data, tmp_path, capsys):
    images, vae = data
    bad_root = tmp_path / 'bad'
    make_image_folder(bad_root, train_per_class=3, val_per_class=1)
    bad = bad_root / 'train' / 'class1' / '1.png'
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    args = ['--data_path', str(bad_root), '--vae_ckpt', str(vae), *TINY_MODEL, *TINY_RUN, '--bs', '9',
            '--max_steps', '2', '--workers', '1']
    err = _fails([*args, '--out_dir', str(tmp_path / 'a')], capsys, f'cannot read image {bad}')
    assert '--skip_bad_images' in err
    # Its data worker ignores SIGTERM, so the failed run must have shut it down itself (else the exit would hang).
    assert not multiprocessing.active_children()
    assert run(train_cli.main, train_cli.get_parser(),
               [*args, '--out_dir', str(tmp_path / 'b'), '--skip_bad_images']) == 0
    assert f'cannot read image {bad}' in (tmp_path / 'b' / 'stdout.txt').read_text()
