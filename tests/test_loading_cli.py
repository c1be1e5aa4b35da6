"""`load_models` for every checkpoint layout, and the shared one-line CLI error style."""
import pytest
import torch

from tests.tiny import GOLDEN_DIR, make_vae, make_var
from utils.checkpoint import CheckpointError, save_atomic, save_safetensors
from utils.cli import ArgumentParser, UserError, run
from utils.model_checkpoints import KIND_VAR, KIND_VQVAE, load_models, model_checkpoint


@pytest.fixture()
def pair(tmp_path):
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1)
    vae = make_vae(patch_nums=var.patch_nums)
    return tmp_path, var, vae


def test_own_checkpoints_rebuild_from_config(pair):
    tmp, var, vae = pair
    save_atomic(model_checkpoint(KIND_VAR, var, vae_config=vae.config.to_dict(), step=5), tmp / 'ar.pth')
    save_atomic(model_checkpoint(KIND_VQVAE, vae), tmp / 'vae.pth')
    vae2, var2 = load_models(tmp / 'ar.pth', tmp / 'vae.pth')
    assert var2.config == var.config and vae2.config == vae.config and var2.vae is vae2
    assert torch.equal(var2.head.weight, var.head.weight)
    # A bare tokenizer state dict works too: its config comes from the AR checkpoint.
    save_safetensors(vae.state_dict(), tmp / 'vae.safetensors')
    vae3, _ = load_models(tmp / 'ar.pth', tmp / 'vae.safetensors')
    assert vae3.config == vae.config


def test_released_layout_by_preset_or_inference():
    vae, var = load_models(GOLDEN_DIR / 'viar.pth', GOLDEN_DIR / 'vae.pth')
    assert var.use_implicit and var.C == 128 and vae.V == 64
    with pytest.raises(ValueError, match='unknown preset'):
        load_models(GOLDEN_DIR / 'viar.pth', GOLDEN_DIR / 'vae.pth', preset='viar-d99')
    with pytest.raises(CheckpointError, match='does not fit VAR'):
        load_models(GOLDEN_DIR / 'viar.pth', GOLDEN_DIR / 'vae.pth', preset='viar-d30')


def test_mismatches_are_named(pair):
    tmp, var, vae = pair
    save_atomic(model_checkpoint(KIND_VAR, var), tmp / 'ar.pth')
    save_atomic(model_checkpoint(KIND_VQVAE, vae), tmp / 'vae.pth')
    with pytest.raises(CheckpointError, match='VIAR .*drop --use_implicit|VIAR'):
        load_models(tmp / 'ar.pth', tmp / 'vae.pth', expect_implicit=False)
    with pytest.raises(CheckpointError, match='is a vqvae checkpoint'):
        load_models(tmp / 'vae.pth', tmp / 'vae.pth')
    other = make_vae(patch_nums=(1, 2, 4), ch_mult=(1,))
    save_atomic(model_checkpoint(KIND_VQVAE, other), tmp / 'other.pth')
    with pytest.raises(CheckpointError, match='patch_nums'):
        load_models(tmp / 'ar.pth', tmp / 'other.pth')


def test_cli_error_style(capsys):
    def main(args):
        if args.n < 0:
            raise UserError('--n must be >= 0\nsecond line')
        return 0

    parser = ArgumentParser(prog='tool')
    parser.add_argument('--n', type=int, default=1)
    assert run(main, parser, ['--n', '3']) == 0
    assert run(main, parser, ['--n', '-1']) == 2
    err = capsys.readouterr().err
    assert err == 'tool: error: --n must be >= 0 second line\n'
    assert run(main, parser, ['--n', 'x']) == 2  # argparse's refusal is returned as a code, as main's errors are
    assert capsys.readouterr().err.count('\n') == 1
    with pytest.raises(UserError):
        run(main, parser, ['--n', '-1', '--debug'])
