"""VAR / VIAR models and the multi-scale VQVAE tokenizer.

VIAR is not a class of its own: it is `VAR` with `VARConfig(use_implicit=True)`. Embeddings, head, sampler and
checkpoint keys are shared; the only difference is the trunk, described once by `trunk.trunk_stages` (VAR: `blocks`;
VIAR: `pre_blocks`, the implicit layer, `post_blocks`) and run by `trunk.run_trunk` for teacher forcing and sampling.

Files:
    vae_nets, quantizer, vqvae    the tokenizer: conv encoder/decoder, multi-scale residual quantizer, VQVAE
    lpips, discriminator          tokenizer training losses
    blocks                        AdaLN self-attention block, the head's AdaLN
    implicit                      the implicit layer: fusion MLP, fixed-point map, S-JFB split and cached solve
    fixed_point                   fixed-point solvers (Picard, Anderson)
    trunk                         the trunk's stages, run once for teacher forcing and sampling, and its KV caches
    var                           VARConfig, VAR (= VIAR), the size registry VAR_PRESETS
    kv_cache                      KV caches and the implicit block's two cache policies
    sampler, schedules, subnet    the one sampler and the check of its knobs, iterations per scale, VARiant subsets
    config_base                   config <-> checkpoint dict
Models are pure: no random generator and no state kept from the last call. A trainer draws the S-JFB counts
(`no_grad_iters`, `grad_iters`) from the ranges `VARConfig.no_grad_iters_range` / `grad_iters_range` and passes them
as `sjfb_iters`; `VARConfig.eval_iters` fixes the validation forward and the default sampling schedule.

Shape suffixes used throughout (e.g. `logits_BLV`, `idx_Bl`, `f_hat_BChw`):
    B  batch                         L  tokens of all scales (680 for 256px)    l  tokens of one scale (pn*pn)
    C  transformer width             D  condition width (= C)                    H  attention heads
    c  head width (64)               V  vocabulary (4096)                        Cv / Cvae  latent channels (32)
    h, w  latent height/width        pn side of one scale's token map            K  number of scales
"""
from typing import Optional, Sequence, Tuple

import torch

from .var import VAR, VAR_PRESETS, VARConfig
from .vqvae import DEFAULT_PATCH_NUMS, VQVAE, VQVAE_PRESETS, VQVAEConfig

__all__ = ['VAR', 'VARConfig', 'VAR_PRESETS', 'VQVAE', 'VQVAEConfig', 'VQVAE_PRESETS', 'build_vae_var', 'build_var',
           'build_vqvae', 'num_params']


def build_vqvae(config: VQVAEConfig, device='cpu') -> VQVAE:
    """Build a tokenizer on `device` ('meta' allocates nothing)."""
    with torch.device(device):
        return VQVAE(config)


def build_var(config: VARConfig, device='cpu') -> VAR:
    """Build a VAR/VIAR transformer on `device` ('meta' allocates nothing)."""
    with torch.device(device):
        return VAR(config)


def build_vae_var(
    device='cpu', patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS,
    V: int = 4096, Cvae: int = 32, ch: int = 160, share_quant_resi: int = 4,
    num_classes: int = 1000, depth: int = 16, shared_aln: bool = False, attn_l2_norm: bool = True,
    flash_if_available: bool = True, fused_if_available: bool = True,
    init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1,
    use_implicit: bool = False, pre_depth: int = 5, post_depth: int = 5,
    vae_config: Optional[VQVAEConfig] = None, **var_overrides,
) -> Tuple[VQVAE, VAR]:
    """Drop-in for the official factory: returns (frozen vae, var) with the VAE attached to the VAR for sampling.

    `flash_if_available` / `fused_if_available` are accepted for compatibility; attention always goes through
    `scaled_dot_product_attention`, which picks flash kernels itself. Unlike the official factory this never
    disables `reset_parameters` process-wide. Extra keyword arguments override `VARConfig` fields.
    """
    del flash_if_available, fused_if_available
    patch_nums = tuple(patch_nums)
    if vae_config is None:
        vae_config = VQVAEConfig(vocab_size=V, z_channels=Cvae, ch=ch, share_quant_resi=share_quant_resi,
                                 patch_nums=patch_nums)
    var_config = VARConfig(
        depth=depth, num_classes=num_classes, patch_nums=patch_nums, vocab_size=V, Cvae=Cvae, shared_aln=shared_aln,
        attn_l2_norm=attn_l2_norm, init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head,
        init_std=init_std, use_implicit=use_implicit, pre_depth=pre_depth, post_depth=post_depth, **var_overrides)
    vae = build_vqvae(vae_config, device).freeze()
    var = build_var(var_config, device)
    var.attach_vae(vae)
    return vae, var


def num_params(module: torch.nn.Module) -> int:
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in module.parameters())
