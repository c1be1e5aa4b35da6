"""gen_img.py: grids, traces and zero-shot editing from the command line (run in-process)."""
import json

import numpy as np
import pytest
from PIL import Image

from generation import gen_img_cli
from tests.tiny import make_vae, make_var, save_tiny_checkpoints
from utils.checkpoint import save_atomic
from utils.cli import run
from utils.model_checkpoints import KIND_VAR, model_checkpoint


@pytest.fixture(scope='module')
def ckpt_args(tmp_path_factory):
    d = save_tiny_checkpoints(tmp_path_factory.mktemp('ckpts'))
    return ['--ckpt', str(d / 'ar.pth'), '--vae_ckpt', str(d / 'vae.pth'), '--top_k', '10', '--schedule', 'const:3']


def test_grid_and_trace(ckpt_args, tmp_path):
    rc = run(gen_img_cli.main, gen_img_cli.get_parser(),
             ckpt_args + ['--classes', '0,3', '--seeds', '5-7', '--save_grid', '--trace', '--out_dir', str(tmp_path)])
    assert rc == 0
    assert len(list(tmp_path.glob('class*_seed*.png'))) == 6
    grid = np.asarray(Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3)  # 2 rows x 3 columns of 8px images, 2px padding
    trace = json.loads((tmp_path / 'trace.json').read_text())
    assert sorted(trace) == ['scale_0_1x1', 'scale_1_2x2', 'scale_2_3x3', 'scale_3_4x4']
    assert all(len(v) == 3 and {'residual', 'cosine'} <= set(v[0]) for v in trace.values())
    assert (tmp_path / 'trace.png').stat().st_size > 0


def test_same_seed_same_image_across_invocations(ckpt_args, tmp_path):
    for sub, classes in (('a', '3'), ('b', '0,3')):
        run(gen_img_cli.main, gen_img_cli.get_parser(), ckpt_args + ['--classes', classes, '--seeds', '7',
                                                             '--out_dir', str(tmp_path / sub)])
    a, b = (np.asarray(Image.open(tmp_path / s / 'class3_seed7.png')) for s in 'ab')
    assert np.array_equal(a, b)


def test_inpainting_from_box(ckpt_args, tmp_path):
    src = tmp_path / 'src.png'
    Image.fromarray((np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)).save(src)
    out = tmp_path / 'out'
    rc = run(gen_img_cli.main, gen_img_cli.get_parser(), ckpt_args + ['--edit_image', str(src), '--box', '0,0,0.5,0.5',
                                                             '--seeds', '0-1', '--out_dir', str(out)])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {'source.png', 'source_kept.png', 'edit5_seed0.png',
                                               'edit5_seed1.png'}


@pytest.mark.parametrize('extra,message', [
    (['--classes', '7'], 'out of range'),
    (['--edit_image', 'missing.png', '--box', '0,0,1,1'], 'not found'),
    (['--edit_image', __file__, '--box', '0,0,1,1'], 'cannot read'),
    (['--top_p', '-0.1'], 'top_p'),
    (['--batch_size', '0'], 'batch_size'),
    (['--seeds', 'a-b'], 'seeds'),
])
def test_errors(ckpt_args, tmp_path, capsys, extra, message):
    rc = run(gen_img_cli.main, gen_img_cli.get_parser(), ckpt_args + ['--out_dir', str(tmp_path)] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count('\n') == 1, err


def test_subnet_flags(ckpt_args, tmp_path, capsys):
    var = make_var(depth=4)
    vae = make_vae(patch_nums=var.patch_nums)
    save_atomic(model_checkpoint(KIND_VAR, var, vae_config=vae.config.to_dict()), tmp_path / 'var.pth')
    base = ['--ckpt', str(tmp_path / 'var.pth'), '--vae_ckpt', ckpt_args[3], '--classes', '1', '--seeds', '0',
            '--top_k', '10']
    out = {}
    for d in ('4', '2'):
        assert run(gen_img_cli.main, gen_img_cli.get_parser(),
                   base + ['--subnet_depth', d, '--bridge', '2', '--out_dir', str(tmp_path / d)]) == 0
        out[d] = np.asarray(Image.open(tmp_path / d / 'class1_seed0.png'))
    assert out['4'].shape == out['2'].shape == (8, 8, 3)
    assert run(gen_img_cli.main, gen_img_cli.get_parser(),
               base + ['--subnet_depth', '9', '--out_dir', str(tmp_path)]) == 2
    assert 'subnet_depth must lie in [2, 4]' in capsys.readouterr().err
    assert run(gen_img_cli.main, gen_img_cli.get_parser(), ckpt_args + ['--subnet_depth', '2', '--out_dir',
                                                               str(tmp_path)]) == 2
    assert 'for VIAR use --schedule' in capsys.readouterr().err
