"""Numerical faithfulness to the official VAR/VIAR code on its own tiny random weights (fixtures/official_tiny)."""
import pytest
import torch

from models import VARConfig, VQVAEConfig, build_var, build_vqvae
from utils.checkpoint import load_state_dict_strict

TOL = 1e-4


def _vae_config(cfg) -> VQVAEConfig:
    c = cfg['vae']
    assert cfg['image_size'] == c['patch_nums'][-1] * 16
    return VQVAEConfig(vocab_size=c['vocab_size'], z_channels=c['z_channels'], ch=c['ch'],
                       share_quant_resi=c['share_quant_resi'], beta=c['beta'], using_znorm=c['using_znorm'],
                       quant_conv_ks=c['quant_conv_ks'], quant_resi=c['quant_resi'], patch_nums=tuple(c['patch_nums']))


def _var_config(cfg, name) -> VARConfig:
    c = cfg[name]
    return VARConfig(depth=c['depth'], embed_dim=c['embed_dim'], num_heads=c['num_heads'],
                     num_classes=c['num_classes'], patch_nums=tuple(cfg['vae']['patch_nums']),
                     vocab_size=cfg['vae']['vocab_size'], Cvae=cfg['vae']['z_channels'], shared_aln=c['shared_aln'],
                     attn_l2_norm=c['attn_l2_norm'], norm_eps=c.get('norm_eps', cfg['var']['norm_eps']),
                     use_implicit=name == 'viar',
                     pre_depth=c.get('pre_depth', 5), post_depth=c.get('post_depth', 5), cond_drop_rate=0.0)


@pytest.fixture(scope='module')
def vae(golden):
    vae = build_vqvae(_vae_config(golden['config'])).freeze()
    load_state_dict_strict(vae, golden['vae'], 'golden vae.pth')
    return vae


def _var(golden, vae, name):
    var = build_var(_var_config(golden['config'], name)).eval()
    load_state_dict_strict(var, golden[name], f'golden {name}.pth')
    return var.attach_vae(vae)


def test_vae_tokens_identical(golden, vae):
    io = golden['io']
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(io['img_B3HW'])
    assert len(idx_Bl) == len(io['idx_Bl'])
    for ours, ref in zip(idx_Bl, io['idx_Bl']):
        assert torch.equal(ours, ref)


def test_vae_reconstruction(golden, vae):
    io = golden['io']
    with torch.no_grad():
        from_idx = vae.idxBl_to_img(io['idx_Bl'], same_shape=True, last_one=True)
        from_img = vae.img_to_reconstructed_img(io['img_B3HW'], last_one=True)
    assert (from_idx - io['recon_B3HW']).abs().max() < TOL
    assert (from_img - io['recon_B3HW']).abs().max() < TOL


def test_teacher_forcing_input(golden, vae):
    io = golden['io']
    with torch.no_grad():
        x = vae.quantize.idxBl_to_var_input(io['idx_Bl'])
    assert x.shape == io['x_BLCv_wo_first_l'].shape
    assert (x - io['x_BLCv_wo_first_l']).abs().max() < TOL


@pytest.mark.parametrize('name', ['var', 'viar'])
def test_teacher_forced_logits(golden, vae, name):
    io = golden['io']
    var = _var(golden, vae, name)
    # The official VIAR run used 3 detached + 2 recorded iterations.
    iters = (3, 2) if name == 'viar' else None
    with torch.no_grad():
        logits = var(io['label_B'], io['x_BLCv_wo_first_l'], sjfb_iters=iters)
    ref = io[f'{name}_logits_BLV']
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max() < TOL


@pytest.mark.parametrize('name', ['var', 'viar'])
def test_greedy_cfg_sample(golden, vae, name):
    io, s = golden['io'], golden['config']['sampling']
    var = _var(golden, vae, name)
    left, right = golden['config']['viar']['schedule_linear']
    img = var.autoregressive_infer_cfg(B=3, label_B=io['label_B'], cfg=s['cfg'], top_k=s['top_k'], top_p=s['top_p'],
                                       iter_left=left, iter_right=right)
    ref = io[f'{name}_greedy_sample_B3HW']
    assert img.shape == ref.shape
    assert (img - ref).abs().max() < TOL


@pytest.mark.parametrize('name', ['var', 'viar'])
def test_config_recovered_from_state_dict(golden, name):
    cfg = VARConfig.from_state_dict(golden[name])
    expected = _var_config(golden['config'], name)
    for field in ('embed_dim', 'num_heads', 'num_classes', 'patch_nums', 'vocab_size', 'Cvae', 'use_implicit',
                  'attn_l2_norm', 'shared_aln', 'pre_depth', 'post_depth'):
        if field in ('pre_depth', 'post_depth') and name == 'var':
            continue
        assert getattr(cfg, field) == getattr(expected, field), field
    load_state_dict_strict(build_var(cfg), golden[name])


def test_vae_config_recovered_from_state_dict(golden):
    cfg = VQVAEConfig.from_state_dict(golden['vae'], patch_nums=golden['config']['vae']['patch_nums'])
    assert cfg == _vae_config(golden['config'])
