"""Multi-scale residual quantizer and VQVAE: Phi sharing, round trips, teacher-forcing/sampling consistency."""
import pytest
import torch
import torch.nn.functional as F

from models import VQVAE, VQVAEConfig, build_vqvae
from models.quantizer import MultiScaleQuantizer, phi_index
from tests.tiny import make_vae
from utils.checkpoint import load_state_dict_strict


def test_phi_index_released_table():
    # 4 convs over 10 scales; scales 2 and 7 are exact ties decided by float64 rounding.
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(si, 4, 4) for si in range(4)] == [0, 1, 2, 3]
    assert [phi_index(si, 3, 3) for si in range(3)] == [0, 1, 2]


@pytest.mark.parametrize('share,expected', [(0, 'quantize.quant_resi.0.weight'),
                                            (1, 'quantize.quant_resi.qresi.weight'),
                                            (4, 'quantize.quant_resi.qresi_ls.3.weight')])
def test_phi_sharing_key_layouts(share, expected):
    vae = build_vqvae(VQVAEConfig(share_quant_resi=share, ch=32, vocab_size=16, z_channels=8), 'meta')
    keys = vae.state_dict().keys()
    assert expected in keys
    assert VQVAEConfig.from_state_dict(vae.state_dict()).share_quant_resi == share


def _quantizer(V=16, C=4, patch_nums=(1, 2, 4), quant_resi=0.5, share=4):
    torch.manual_seed(0)
    return MultiScaleQuantizer(V, C, patch_nums, quant_resi=quant_resi, share_quant_resi=share)


def test_exact_round_trip_with_identity_phi():
    # A constant latent equal to a code is recovered exactly: scale 0 takes that code, later scales the zero code.
    q = _quantizer(quant_resi=0.0)
    with torch.no_grad():
        q.embedding.weight[0].zero_()
        q.embedding.weight[5] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    f = q.embedding.weight[5].detach().view(1, 4, 1, 1).expand(2, 4, 4, 4).clone()
    idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    assert idx[0].tolist() == [[5], [5]]
    assert all((i == 0).all() for i in idx[1:])
    f_hat = q.f_to_idxBl_or_fhat(f, to_fhat=True)[-1]
    assert torch.allclose(f_hat, f, atol=1e-6)


def test_indices_reproduce_encoder_fhat():
    q = _quantizer()
    f = torch.randn(3, 4, 4, 4)
    idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    f_hats = q.f_to_idxBl_or_fhat(f, to_fhat=True)
    h = [q.embedding(i).transpose(1, 2).reshape(3, 4, pn, pn) for i, pn in zip(idx, q.v_patch_nums)]
    with torch.no_grad():
        rebuilt = q.embed_to_fhat(h, all_to_max_scale=True, last_one=False)
    for a, b in zip(rebuilt, f_hats):
        assert torch.allclose(a, b, atol=1e-5)
    # Residual quantization never gets worse than quantizing nothing.
    assert (f_hats[-1] - f).norm() < f.norm()


def test_teacher_forcing_matches_autoregressive_inputs():
    q = _quantizer(patch_nums=(1, 2, 3, 4))
    f = torch.randn(2, 4, 4, 4)
    idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    with torch.no_grad():
        x_tf = q.idxBl_to_var_input(idx)
        f_hat = torch.zeros(2, 4, 4, 4)
        inputs = []
        K = len(q.v_patch_nums)
        for si, pn in enumerate(q.v_patch_nums):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(2, 4, pn, pn)
            f_hat, nxt = q.get_next_autoregressive_input(si, K, f_hat, h)
            if si < K - 1:
                inputs.append(nxt.flatten(2).transpose(1, 2))
    assert x_tf.shape == (2, 4 + 9 + 16, 4)
    assert torch.allclose(x_tf, torch.cat(inputs, dim=1), atol=1e-6)
    assert torch.allclose(f_hat, q.f_to_idxBl_or_fhat(f, to_fhat=True)[-1], atol=1e-5)


def test_vqvae_training_forward():
    vae = make_vae()
    vae.train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, usages, vq_loss = vae(x, ret_usages=True)
    assert rec.shape == x.shape
    assert vq_loss.ndim == 0 and torch.isfinite(vq_loss)
    assert len(usages) == 4 and all(0 <= u <= 100 for u in usages)
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0  # code hits recorded without a process group
    (F.mse_loss(rec, x) + vq_loss).backward()
    # Straight-through: the encoder gets gradient from the reconstruction loss; the codebook from the VQ loss.
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vae.quantize.quant_resi.parameters())


def test_partial_pyramid_decodes_and_shapes():
    vae = make_vae().freeze()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        idx = vae.img_to_idxBl(x)
        assert [i.shape for i in idx] == [(2, 1), (2, 4), (2, 9), (2, 64)]
        imgs = vae.idxBl_to_img(idx, same_shape=True)
        assert len(imgs) == 4 and all(i.shape == x.shape for i in imgs)
        assert all(i.min() >= -1 and i.max() <= 1 for i in imgs)
        partial = vae.idxBl_to_img(idx[:2], same_shape=True, last_one=True)
        assert torch.allclose(partial, imgs[1])
        progressive = vae.idxBl_to_img(idx, same_shape=False, last_one=True)
        assert progressive.shape == x.shape


def test_shape_errors():
    vae = make_vae()
    with pytest.raises(ValueError, match='last patch_num'):
        vae.img_to_idxBl(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match='GroupNorm'):
        VQVAEConfig(ch=20)
    with pytest.raises(ValueError, match='increasing'):
        VQVAEConfig(patch_nums=(4, 2, 1))


def test_ema_buffer_with_other_scale_count_still_loads():
    vae = make_vae()
    sd = dict(vae.state_dict())
    sd['quantize.ema_vocab_hit_SV'] = torch.ones(7, 32)
    VQVAE.load_state_dict(vae, sd, strict=True)
    assert vae.quantize.ema_vocab_hit_SV.shape == (4, 32)
    meta = build_vqvae(vae.config, 'meta')
    load_state_dict_strict(meta, sd, assign=True)
    assert not meta.quantize.ema_vocab_hit_SV.is_meta and meta.quantize.ema_vocab_hit_SV.sum() == 0
