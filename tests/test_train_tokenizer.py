"""train_tokenizer.py on tiny data: reconstruction improves and codes stay in use, 2 ranks with GAN + perceptual
terms and dead-code restarts stay identical, exact resume (and a refused one with another recipe), the released
format, and missing perceptual weights."""
import pytest
import torch

from models.lpips import LPIPS
from tests.train_helpers import TINY_PATCH_NUMS, load_weights, make_image_folder, read_log, run_cli
from training import train_cli, train_tokenizer_cli
from training.checkpoints import RESUMABLE_FLAGS, recipe_changes
from utils.cli import run
from utils.model_checkpoints import load_vae

from tests.train_helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures('one_thread')

TINY_VAE = ['--vocab_size', '32', '--z_channels', '8', '--ch', '32', '--ch_mult', '1', '2', '--num_res_blocks', '1',
            '--pn', '_'.join(map(str, TINY_PATCH_NUMS))]
TINY_RUN = ['--bs', '8', '--tblr', '0.02', '--workers', '0', '--no-progress']
GAN = ['--gan_weight', '0.1', '--disc_start', '2', '--disc_width', '16', '--disc_layers', '2']


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('tok') / 'images', noise=20)


def _args(images, out, *extra):
    return ['--data_path', str(images), '--out_dir', str(out), *TINY_VAE, *TINY_RUN, *extra]


def test_reconstruction_improves_and_codes_stay_used(images, tmp_path, capsys):
    out = tmp_path / 'out'
    args = _args(images, out, '--ep', '20', '--save_freq', '20', '--log_freq', '1', '--restart_every', '5')
    assert run(train_tokenizer_cli.main, train_tokenizer_cli.get_parser(), args) == 0
    log = read_log(out)
    first = next(r['loss/rec_l2'] for r in log if 'loss/rec_l2' in r)
    val = next(r for r in log if 'val/rec_l2' in r)
    assert val['val/rec_l2'] < 0.5 * first, (first, val)
    assert val['val/codes_used_pct'] >= 75
    assert sum(r.get('codes/restarted', 0) for r in log) > 0
    # Both files load on their own: the training checkpoint and the bare (released-format) state dict.
    vae = load_vae(out / 'vae-ckpt-best.pth')
    bare = load_vae(out / 'vae-best.pth', patch_nums=TINY_PATCH_NUMS)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), bare.state_dict().values()))
    assert set(torch.load(out / 'vae-best.pth', weights_only=True)) == set(vae.state_dict())
    # A bare state dict does not store its scales: train.py and --init_from take them as --pn.
    ar = ['--data_path', str(images), '--out_dir', str(tmp_path / 'ar'), '--depth', '1', '--embed_dim', '64',
          '--num_heads', '1', '--bs', '8', '--workers', '0', '--max_steps', '1',
          '--vae_ckpt', str(out / 'vae-best.pth')]
    assert run(train_cli.main, train_cli.get_parser(), ar) == 2
    assert '--pn' in capsys.readouterr().err
    assert run(train_cli.main, train_cli.get_parser(), [*ar, '--pn', '1_2_3_8']) == 0
    again = ['--data_path', str(images), '--out_dir', str(tmp_path / 'again'), '--init_from', str(out / 'vae-best.pth'),
             '--pn', '1_2_3_8', *TINY_RUN, '--max_steps', '1']
    assert run(train_tokenizer_cli.main, train_tokenizer_cli.get_parser(), again) == 0


def test_two_ranks_with_gan_lpips_and_restarts(images, tmp_path):
    vgg = tmp_path / 'vgg16.pth'  # random VGG16 features: the term runs, its value means nothing
    torch.save({f'features.{k}': v for k, v in LPIPS().features.state_dict().items()}, vgg)
    out = tmp_path / 'two'
    run_cli('train_tokenizer.py', _args(images, out, *GAN, '--ep', '30', '--max_steps', '4', '--log_freq', '1',
                                        '--restart_every', '2', '--dead_threshold', '0.5', '--lpips_weights',
                                        str(vgg)), nproc=2)
    log = read_log(out)
    assert {'loss/lpips', 'loss/gan_g', 'loss/gan_d'} <= set(log[-1]) and log[-1]['loss/lpips'] > 0
    assert sum(r.get('codes/restarted', 0) for r in log) > 0
    # The ranks hashed tokenizer and discriminator weights (codebook and hit EMA included) and agreed.
    assert 'identical on 2 rank(s)' in (out / 'stdout.txt').read_text()
    assert 'disc' in torch.load(out / 'vae-ckpt-last.pth', weights_only=True)


def test_resume_is_exact(images, tmp_path):
    common = [*GAN, '--ep', '30', '--log_freq', '1', '--restart_every', '3', '--dead_threshold', '0.5']
    parser = train_tokenizer_cli.get_parser()
    assert run(train_tokenizer_cli.main, parser, _args(images, tmp_path / 'a', *common, '--max_steps', '8')) == 0
    assert run(train_tokenizer_cli.main, parser, _args(images, tmp_path / 'b', *common, '--max_steps', '4')) == 0
    assert run(train_tokenizer_cli.main, parser, _args(images, tmp_path / 'b', *common, '--max_steps', '8')) == 0
    a, b = (torch.load(p / 'vae-ckpt-last.pth', weights_only=True) for p in (tmp_path / 'a', tmp_path / 'b'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert all(torch.equal(a['disc'][k], b['disc'][k]) for k in a['disc']) and a['record_hit'] == b['record_hit']
    assert load_weights(tmp_path / 'a' / 'vae-ckpt-last.pth').keys() == a['model'].keys()


def test_missing_perceptual_weights_is_one_line(images, tmp_path, capsys):
    args = _args(images, tmp_path, '--lpips_weights', str(tmp_path / 'vgg16-397923af.pth'), '--max_steps', '1')
    assert run(train_tokenizer_cli.main, train_tokenizer_cli.get_parser(), args) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'VGG16' in err and 'leave --lpips_weights out' in err
    assert run(train_tokenizer_cli.main, train_tokenizer_cli.get_parser(),
               _args(images, tmp_path, '--init_from', 'x.pth', '--max_steps', '1')) == 2
    assert '--init_from fixes the architecture' in capsys.readouterr().err


def test_resume_refuses_another_recipe(images, tmp_path, capsys):
    """A reused output folder continues only the run that was started there: another --l1_weight or GAN onset stops
    it with the changed flags named (a finished run would otherwise be returned as if trained with them); flags of
    the run's extent and logging may change; --resume PATH continues on purpose."""
    parser, out = train_tokenizer_cli.get_parser(), tmp_path / 'out'
    base = _args(images, out, *GAN, '--ep', '2', '--max_steps', '2', '--l1_weight', '1')
    assert run(train_tokenizer_cli.main, parser, base) == 0
    before = (out / 'vae-ckpt-last.pth').read_bytes()
    for changed, shown in ((['--l1_weight', '0.5'], '--l1_weight 1.0 (now 0.5)'),
                           (['--disc_start', '3'], '--disc_start 2 (now 3)'),
                           (['--betas', '0.9', '0.99'], '--betas 0.5 0.9 (now 0.9 0.99)')):
        assert run(train_tokenizer_cli.main, parser, [*base, *changed]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and shown in err and 'another --out_dir' in err, err
        assert (out / 'vae-ckpt-last.pth').read_bytes() == before
    extent = ['--max_steps', '3', '--log_freq', '7', '--keep_last', '3']  # flags a resume may change
    assert run(train_tokenizer_cli.main, parser, [*base, *extent]) == 0
    assert torch.load(out / 'vae-ckpt-last.pth', weights_only=True)['it'] == 3
    capsys.readouterr()
    assert run(train_tokenizer_cli.main, parser, [*base, '--max_steps', '4', '--l1_weight', '0.5',
                                                  '--resume', str(out / 'vae-ckpt-last.pth')]) == 0
    captured = capsys.readouterr()
    assert '--l1_weight 1.0 (now 0.5): continuing it with the new values' in captured.out + captured.err
    assert torch.load(out / 'vae-ckpt-last.pth', weights_only=True)['it'] == 4


def test_resumable_flags_exist():
    """Every flag a resume may change is a flag of train.py or train_tokenizer.py (a misspelt entry would let its
    flag change silently... or, here, make a real flag count as recipe)."""
    dests = set()
    for cli in (train_cli, train_tokenizer_cli):
        dests |= {a.dest for a in cli.get_parser()._actions}
    assert RESUMABLE_FLAGS <= dests, RESUMABLE_FLAGS - dests
    assert recipe_changes({'base_lr': 0.01, 'betas': (0.9, 0.99), 'epochs': 2}, {
        'base_lr': 0.02, 'betas': [0.9, 0.99], 'epochs': 4, 'new_flag': 1}) == ['--base_lr 0.01 (now 0.02)']
