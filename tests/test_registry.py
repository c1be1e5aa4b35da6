"""Presets, meta-device construction and parameter counts of the released architectures."""
import pytest
import torch

from models import VAR_PRESETS, VQVAE_PRESETS, VARConfig, build_vae_var, build_var, build_vqvae, num_params

PAPER_COUNTS = {'var-d16': 310_283_520, 'var-d20': 600_917_136, 'var-d24': 1_033_399_360,
                'var-d30': 2_010_020_356, 'viar-d30': 770_884_426}


@pytest.mark.parametrize('name', sorted(PAPER_COUNTS))
def test_preset_param_counts_on_meta(name):
    model = build_var(VAR_PRESETS[name], device='meta')
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert num_params(model) == PAPER_COUNTS[name]


def test_vqvae_param_count_on_meta():
    vae = build_vqvae(VQVAE_PRESETS['vae-ch160v4096z32'], device='meta')
    assert all(p.is_meta for p in vae.parameters())
    assert num_params(vae) == 108_948_355
    assert len(vae.state_dict()) == 324


@pytest.mark.parametrize('depth', [1, 3, 16, 30])
def test_var_param_closed_form(depth):
    # Closed form of the official model: d(18C^2 + 14C + H) + 2C^2 + 5823C + 4096 with C = 64d, H = d.
    C, H = 64 * depth, depth
    assert num_params(build_var(VARConfig(depth=depth), 'meta')) == depth * (18 * C * C + 14 * C + H) + 2 * C * C \
        + 5823 * C + 4096


@pytest.mark.parametrize('name,n_keys', [('var-d16', 220), ('var-d30', 402), ('viar-d30', 159)])
def test_state_dict_key_counts(name, n_keys):
    sd = build_var(VAR_PRESETS[name], 'meta').state_dict()
    assert len(sd) == n_keys
    for key in ('lvl_1L', 'attn_bias_for_masking', 'pos_1LC', 'pos_start'):
        assert key in sd
    assert sd['attn_bias_for_masking'].shape == (1, 1, 680, 680)


def test_viar_param_breakdown():
    var = build_var(VAR_PRESETS['viar-d30'], 'meta')
    assert num_params(var.implicit_block_projection) == 22_124_160
    assert num_params(var.implicit_block) == 66_382_110
    assert len(var.pre_blocks) == 5 and len(var.post_blocks) == 5
    # Drop-path rates follow the nominal layers: pre 0..4, implicit 15, post 25..29 of linspace(0, 0.125, 30).
    assert var.post_blocks[-1].drop_path.drop_prob == pytest.approx(0.125)
    assert var.implicit_block.drop_path.drop_prob == pytest.approx(0.125 * 15 / 29, rel=1e-6)
    assert isinstance(var.pre_blocks[0].drop_path, torch.nn.Identity)


def test_build_vae_var_official_signature():
    vae, var = build_vae_var(device='meta', patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, Cvae=32, ch=160,
                             share_quant_resi=4, num_classes=1000, depth=30, shared_aln=False, attn_l2_norm=True,
                             flash_if_available=True, fused_if_available=True, init_adaln=0.5,
                             init_adaln_gamma=1e-5, init_head=0.02, init_std=-1, use_implicit=True, pre_depth=5,
                             post_depth=5)
    assert num_params(var) == PAPER_COUNTS['viar-d30']
    assert num_params(vae) == 108_948_355
    assert var.vae is vae
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_no_global_side_effects():
    before = torch.nn.Linear.reset_parameters
    build_vae_var(device='meta', depth=2, V=64, Cvae=8, ch=32)
    assert torch.nn.Linear.reset_parameters is before
    lin = torch.nn.Linear(4, 4)  # still initialised normally
    assert lin.weight.abs().sum() > 0


def test_config_round_trip_and_errors():
    cfg = VAR_PRESETS['viar-d30']
    assert VARConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.embed_dim == 1920 and cfg.num_heads == 30 and cfg.drop_path_rate == pytest.approx(0.125)
    with pytest.raises(ValueError, match='unknown field'):
        VARConfig.from_dict({'depth': 2, 'bogus': 1})
    with pytest.raises(ValueError, match='divisible'):
        VARConfig(depth=2, embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match='pre_depth'):
        VARConfig(depth=2, use_implicit=True, pre_depth=3, post_depth=1)
    with pytest.raises(ValueError, match='grad_iters_range'):
        VARConfig(depth=2, use_implicit=True, pre_depth=1, post_depth=1, grad_iters_range=(0, 2))
    with pytest.raises(ValueError, match='patch_nums'):
        VARConfig(depth=2, patch_nums=(2, 1))
