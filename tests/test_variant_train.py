"""VARiant supernet training with train.py: the progressive draw, 2-rank runs that resume bit-exactly, DDP without a
bridge equal to one process, --init_from a full VAR, the constant fine-tuning lr, and the one-line errors."""
import logging
from logging.handlers import BufferingHandler

import pytest
import torch

from models import VARConfig, build_var
from models.subnet import SubnetSpec
from tests.train_helpers import data_args, load_weights, read_log, run_cli
from training import train_cli
from training.supernet import Supernet, supernet_from_args
from utils.checkpoint import save_atomic
from utils.cli import run
from utils.model_checkpoints import KIND_VAR, load_models, load_vae, model_checkpoint

from tests.train_helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures('one_thread')

DEPTH = 4
TINY_VAR = ['--depth', str(DEPTH), '--embed_dim', '64', '--num_heads', '2']
# 24 images, 2 epochs; p(subnet) 0.2 for half an epoch, then linear to 1 at 1.5 epochs, then subnet only.
SUPERNET = ['--subnet_depth', '2', '--phase1_epochs', '0.5', '--phase2_epochs', '1']
TINY_RUN = ['--bs', '8', '--ep', '2', '--tblr', '0.05', '--log_freq', '1', '--no-progress', '--workers', '0',
            '--save_freq', '1']


def train_args(data, out_dir, *extra):
    return data_args(data, out_dir, *TINY_VAR, *TINY_RUN, *extra)


def subnet_log(out_dir):
    """(step, probability, fraction) of every logged optimizer step."""
    return [(r['step'], r['subnet/probability'], r['subnet/fraction']) for r in read_log(out_dir)
            if 'subnet/probability' in r]


# ---- the draw -------------------------------------------------------------------------------------------------------
def test_draw_follows_the_phases_and_is_shared_by_micro_batches():
    sn = Supernet(SubnetSpec(2, 1), phase1_epochs=1, phase2_epochs=2, p_start=0.2, seed=7, iters_per_epoch=10,
                  accum=2)
    # Fractional epoch of the optimizer step's first micro-batch: iteration 11 belongs to the step starting at 10.
    assert [sn.probability(it) for it in (0, 9, 10, 11)] == [0.2, 0.2, 0.2, 0.2]
    assert sn.probability(12) == pytest.approx(0.2 + 0.8 * 0.2 / 2)
    assert sn.probability(20) == pytest.approx(0.6) and sn.probability(30) == pytest.approx(1.0)
    assert sn.probability(31) == pytest.approx(1.0) and sn.probability(32) == 1.0
    draws = [sn.draw(it)[1] for it in range(4000)]
    assert all(draws[i] == draws[i + 1] for i in range(0, 4000, 2))   # one architecture per optimizer step
    assert all(draws[30:])                                            # phase 3: the subnet only
    phase1 = Supernet(SubnetSpec(2, 1), 10 ** 6, 0, 0.2, 7, 10, 1)
    share = sum(phase1.draw(it)[1] for it in range(4000)) / 4000
    assert abs(share - 0.2) < 0.03
    # A pure function of (seed, step): another instance (another rank, a resumed run) draws the same.
    again = Supernet(SubnetSpec(2, 1), 1, 2, 0.2, 7, 10, 2)
    assert [again.draw(it)[1] for it in range(4000)] == draws
    other_seed = Supernet(SubnetSpec(2, 1), 10 ** 6, 0, 0.2, 8, 10, 1)
    assert [other_seed.draw(it)[1] for it in range(200)] != [phase1.draw(it)[1] for it in range(200)]


# ---- 2-rank runs ----------------------------------------------------------------------------------------------------
def test_two_rank_supernet_resumes_bit_exactly(data, tmp_path):
    # Label dropout, drop path and flips are on; two micro-batches per step; a bridge of one scale.
    flags = [*SUPERNET, '--bridge', '1', '--ac', '2', '--hflip']
    run_cli('train.py', train_args(data, tmp_path / 'straight', *flags), nproc=2)
    out = tmp_path / 'stopped'
    run_cli('train.py', train_args(data, out, *flags, '--max_steps', '4'), nproc=2)
    assert torch.load(out / 'ar-ckpt-last.pth', weights_only=True)['it'] == 4
    run_cli('train.py', train_args(data, out, *flags), nproc=2)

    text = (out / 'stdout.txt').read_text()
    assert f'resumed from {out / "ar-ckpt-00000004.pth"} at iteration 4' in text
    assert 'identical on 2 rank(s)' in text and 'subnet draws agree on all 2 rank(s)' in text
    straight, resumed = load_weights(tmp_path / 'straight' / 'ar-ckpt-last.pth'), load_weights(out / 'ar-ckpt-last.pth')
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    # One log entry per optimizer step, p rising 0.2 -> 1 through the phases, the draws those of the formula.
    logged = subnet_log(out)
    assert logged == subnet_log(tmp_path / 'straight')
    assert [s for s, _, _ in logged] == [2, 4, 6, 8, 10, 12]
    probs = [p for _, p, _ in logged]
    assert probs[0] == 0.2 and probs[-1] == 1.0 and probs == sorted(probs) and len(set(probs)) >= 4
    sn = Supernet(SubnetSpec(2, 1), 0.5, 1.0, 0.2, seed=0, iters_per_epoch=6, accum=2)
    assert [f for _, _, f in logged] == [float(sn.draw(s - 2)[1]) for s, _, _ in logged]
    assert {f for _, _, f in logged} == {0.0, 1.0}
    ckpt = torch.load(out / 'ar-ckpt-last.pth', weights_only=True)
    assert ckpt['supernet'] == {'depth': 2, 'bridge': 1, 'selection': 'equidistant', 'layers': [0, DEPTH - 1],
                                'phase1_epochs': 0.5, 'phase2_epochs': 1.0, 'p_start': 0.2}


def test_no_bridge_two_ranks_match_one_rank(data, tmp_path):
    # Without a bridge a subnet step leaves the middle layers unused: DDP must find them, and they must keep no
    # gradient (AdamW skips them) exactly as in one process.
    flags = [*SUPERNET, '--bridge', '0', '--cond_drop_rate', '0', '--drop_path_rate', '0']
    run_cli('train.py', train_args(data, tmp_path / 'two', *flags), nproc=2)
    assert run(train_cli.main, train_cli.get_parser(), train_args(data, tmp_path / 'one', *flags)) == 0
    assert 'DDP looks for unused parameters' in (tmp_path / 'two' / 'stdout.txt').read_text()
    draws = subnet_log(tmp_path / 'two')
    assert draws == subnet_log(tmp_path / 'one') and {f for _, _, f in draws} == {0.0, 1.0}
    one, two = load_weights(tmp_path / 'one' / 'ar-ckpt-last.pth'), load_weights(tmp_path / 'two' / 'ar-ckpt-last.pth')
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    # The checkpoint tells sampling what it was trained for.
    logged = BufferingHandler(capacity=100)
    logging.getLogger('viar').addHandler(logged)
    try:
        load_models(tmp_path / 'one' / 'ar-ckpt-last.pth', data[1])
    finally:
        logging.getLogger('viar').removeHandler(logged)
    assert any('trained as a VARiant supernet: equidistant subnet of 2 layers [0, 3] after a bridge of 0 scales'
               in r.getMessage() for r in logged.buffer)


# ---- --init_from and errors (one process) ---------------------------------------------------------------------------
def _fails(args, capsys, match):
    assert run(train_cli.main, train_cli.get_parser(), args) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and match in err, err


def test_init_from_full_var(data, tmp_path, capsys):
    vae = load_vae(data[1])
    config = VARConfig(depth=DEPTH, embed_dim=64, num_heads=2, num_classes=3, patch_nums=vae.config.patch_nums,
                       vocab_size=vae.config.vocab_size, Cvae=vae.config.z_channels)
    torch.manual_seed(123)
    full = build_var(config)
    ours, bare = tmp_path / 'full.pth', tmp_path / 'bare.pth'
    save_atomic(model_checkpoint(KIND_VAR, full, vae_config=vae.config.to_dict()), ours)
    save_atomic(full.state_dict(), bare)  # the released layout
    images, vae_path = data
    # The paper's fine-tuning: constant lr, no warmup, fresh optimizer; the architecture comes from the checkpoint.
    tune = ['--data_path', str(images), '--vae_ckpt', str(vae_path), *TINY_RUN, '--sche', 'const', '--tlr', '1e-6',
            '--max_steps', '3', *SUPERNET, '--bridge', '1']
    for init in (ours, bare):
        out = tmp_path / f'from-{init.stem}'
        assert run(train_cli.main, train_cli.get_parser(),
                   [*tune, '--init_from', str(init), '--out_dir', str(out)]) == 0
        ckpt = torch.load(out / 'ar-ckpt-last.pth', weights_only=True)
        assert ckpt['it'] == 3 and ckpt['config']['depth'] == DEPTH
        assert {int(s['step']) for s in ckpt['amp']['optimizer']['state'].values()} == {3}
        moved = max((ckpt['model'][k] - v).abs().max().item() for k, v in full.state_dict().items())
        assert 0 < moved < 1e-5  # three Adam steps of 1e-6 from the given weights
        assert {r['opt/lr'] for r in read_log(out) if 'opt/lr' in r} == {1e-6}
    capsys.readouterr()
    _fails([*tune, '--init_from', str(bare), '--out_dir', str(tmp_path / 'x'), '--depth', '6'], capsys,
           '--init_from fixes the architecture; drop --depth')
    torch.manual_seed(0)
    save_atomic(build_var(config.replace(num_classes=5)).state_dict(), tmp_path / 'five.pth')
    _fails([*tune, '--init_from', str(tmp_path / 'five.pth'), '--out_dir', str(tmp_path / 'x')], capsys,
           'does not fit the data and --vae_ckpt: num_classes 5 (data/tokenizer: 3)')
    # A supernet checkpoint resumes only as that supernet; a plain one becomes a supernet through --init_from.
    resume = ['--data_path', str(images), '--vae_ckpt', str(vae_path), *TINY_RUN, '--init_from', str(ours),
              '--out_dir', str(tmp_path / 'from-full'), '--max_steps', '4']
    _fails(resume, capsys, 'is a VARiant supernet checkpoint with depth=2 (flags: None)')
    _fails([*resume, *SUPERNET, '--bridge', '2'], capsys, 'bridge=1 (flags: 2)')
    plain = tmp_path / 'plain'
    assert run(train_cli.main, train_cli.get_parser(), train_args(data, plain, '--max_steps', '1')) == 0
    capsys.readouterr()
    _fails(train_args(data, plain, *SUPERNET, '--bridge', '1', '--max_steps', '2'), capsys,
           'was trained without --subnet_depth; to train a supernet from it, pass --init_from')


def test_supernet_flag_errors(data, tmp_path, capsys):
    out = tmp_path / 'out'
    viar = ['--use_implicit', '--p_depth', '1', '--no_grad_iters_range', '0', '1', '--grad_iters_range', '1', '1']
    _fails(train_args(data, out, *viar, *SUPERNET), capsys,
           '--subnet_depth (VARiant supernet training) applies to explicit VAR models, not VIAR')
    _fails(train_args(data, out, '--subnet_depth', str(DEPTH)), capsys, '--subnet_depth must lie in [2, 3]')
    _fails(train_args(data, out, *SUPERNET, '--bridge', '4'), capsys, '--bridge must lie in [0, 3]')
    _fails(train_args(data, out, '--subnet_depth', '2', '--phase1_epochs', '1', '--phase2_epochs', '1.5'), capsys,
           'must fit in --ep 2')
    # The paper's bridge of 6 scales by default, at most all scales but the last.
    args = train_cli.get_parser().parse_args(['--data_path', 'x', '--subnet_depth', '16', '--ep', '25'])
    assert supernet_from_args(args, False, 30, 10, 100, 1).spec == SubnetSpec(16, 6)
    assert supernet_from_args(args, False, 30, 4, 100, 1).spec == SubnetSpec(16, 3)
