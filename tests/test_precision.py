"""--precision on the CPU: bf16 and fp32 sampling (sampler, gen_img.py, sampling.py) and training (train.py,
train_tokenizer.py) run, and every run logs and saves the precision it used."""
import json
import math

import numpy as np
import pytest
import torch

from generation import gen_img_cli, sampling_cli
from generation.model_flags import autocast, sampling_mode
from models.sampler import autoregressive_infer_cfg
from tests.tiny import make_vae, make_var, save_tiny_checkpoints
from tests.train_helpers import make_image_folder, read_log
from training import train_cli, train_tokenizer_cli
from utils.cli import run

from tests.train_helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures('one_thread')

CPU = torch.device('cpu')
TINY_AR = ['--depth', '2', '--embed_dim', '64', '--num_heads', '2', '--use_implicit', '--p_depth', '1',
           '--no_grad_iters_range', '0', '2', '--grad_iters_range', '1', '2', '--bs', '8', '--workers', '0',
           '--no-progress', '--max_steps', '2', '--log_freq', '1']
TINY_VAE = ['--vocab_size', '32', '--z_channels', '8', '--ch', '32', '--ch_mult', '1', '2', '--num_res_blocks', '1',
            '--pn', '1_2_3_8', '--bs', '8', '--workers', '0', '--no-progress', '--max_steps', '2', '--log_freq', '1']


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp('ckpts'))


def test_sampler_runs_in_bf16_and_fp32_on_the_cpu():
    var = make_var(0, use_implicit=True, pre_depth=1, post_depth=1).eval()
    var.attach_vae(make_vae(patch_nums=var.patch_nums))
    head_dtypes = []
    var.head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        with sampling_mode(CPU, dtype):
            images[dtype] = autoregressive_infer_cfg(var, 2, 1, image_seeds=[1, 2], top_k=10, top_p=0.9).float()
        assert images[dtype].shape == (2, 3, 8, 8) and torch.isfinite(images[dtype]).all()
        assert set(head_dtypes) == {dtype}     # autocast really ran the transformer in bf16
        with torch.inference_mode(), autocast(CPU, dtype):     # what sampling_mode replaces: the same images
            assert torch.equal(autoregressive_infer_cfg(var, 2, 1, image_seeds=[1, 2], top_k=10, top_p=0.9).float(),
                               images[dtype])
        head_dtypes.clear()
    assert (images[torch.bfloat16] - images[torch.float32]).abs().mean() < 0.25


def test_gen_img_precision_and_its_dtype_alias(ckpts, tmp_path, capsys):
    base = ['--ckpt', str(ckpts / 'ar.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'), '--top_k', '10', '--schedule',
            'const:2', '--classes', '1', '--seeds', '3']
    for flag, name, dtype in (('--precision', 'bf16', 'bfloat16'), ('--dtype', 'fp32', 'float32')):
        out = tmp_path / name
        assert run(gen_img_cli.main, gen_img_cli.get_parser(), [*base, flag, name, '--out_dir', str(out)]) == 0
        assert f'precision torch.{dtype}' in capsys.readouterr().out and (out / 'class1_seed3.png').is_file()


def test_sampling_saves_the_precision_in_its_json(ckpts, tmp_path):
    args = ['--ckpt', str(ckpts / 'ar.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'), '--sample_dir', str(tmp_path),
            '--per_class', '1', '--classes', '0,1', '--batch_size', '2', '--top_k', '10', '--schedule', 'const:2',
            '--name', 'run', '--precision', 'bf16']
    assert run(sampling_cli.main, sampling_cli.get_parser(), args) == 0
    assert json.loads((tmp_path / 'run.json').read_text())['knobs']['dtype'] == 'bfloat16'
    with np.load(tmp_path / 'run.npz') as npz:
        assert npz['arr_0'].shape == (2, 8, 8, 3)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('prec') / 'images', noise=20)


def _saved_precision(path) -> str:
    return torch.load(path, map_location='cpu', weights_only=True)['amp']['precision']


@pytest.mark.parametrize('precision', ['bf16', 'fp32'])
def test_training_runs_in_bf16_and_fp32_on_the_cpu(data, images, tmp_path, precision):
    image_dir, vae = data
    out = tmp_path / 'ar'
    args = ['--data_path', str(image_dir), '--vae_ckpt', str(vae), '--out_dir', str(out), *TINY_AR,
            '--precision', precision]
    assert run(train_cli.main, train_cli.get_parser(), args) == 0
    assert _saved_precision(out / 'ar-ckpt-last.pth') == precision
    losses = [r['train/L_mean'] for r in read_log(out) if 'train/L_mean' in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert f'| {precision} |' in (out / 'stdout.txt').read_text()     # the plan line logs it
    tok = tmp_path / 'tok'
    args = ['--data_path', str(images), '--out_dir', str(tok), *TINY_VAE, '--precision', precision]
    assert run(train_tokenizer_cli.main, train_tokenizer_cli.get_parser(), args) == 0
    assert _saved_precision(tok / 'vae-ckpt-last.pth') == precision
    rec = [r['loss/rec_l2'] for r in read_log(tok) if 'loss/rec_l2' in r]
    assert rec and all(math.isfinite(x) for x in rec)


def test_fp16_training_on_the_cpu_says_it_runs_in_fp32(data, tmp_path):
    image_dir, vae = data
    out = tmp_path / 'ar'
    args = ['--data_path', str(image_dir), '--vae_ckpt', str(vae), '--out_dir', str(out), *TINY_AR, '--fp16', '1']
    assert run(train_cli.main, train_cli.get_parser(), args) == 0
    assert '--precision fp16 needs CUDA (on the CPU use bf16): training in fp32' in (out / 'stdout.txt').read_text()
    assert _saved_precision(out / 'ar-ckpt-last.pth') == 'fp32'
