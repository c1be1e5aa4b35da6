"""Transformer blocks of VAR/VIAR: AdaLN self-attention blocks and the head's AdaLN."""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kv_cache import KVCache

# Upper bound of the learnable attention temperature exp(s_h) under attn_l2_norm. Computed in float32 and
# converted, like the official code, so the clamp threshold is bit-identical.
MAX_SCALE_MUL = torch.log(torch.tensor(100.0)).item()
INIT_SCALE_MUL = 4.0  # exp(s_h) starts at 4
# The activation of the FFN and the fusion MLP (VARConfig.mlp_act): the official GELU with the tanh approximation, or
# the exact (erf) GELU. The two differ by at most 5e-4, but PyTorch's CPU kernel of the tanh form is 2.5x slower
# forward and backward (8.8 vs 3.4 ms on a demo-sized activation in bf16 on 2 cores).
MLP_ACTIVATIONS = {'gelu_tanh': 'tanh', 'gelu': 'none'}  # name -> nn.GELU's `approximate`


def mlp_activation(name: str) -> nn.GELU:
    """The nn.GELU named by VARConfig.mlp_act."""
    return nn.GELU(approximate=MLP_ACTIVATIONS[name])


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth, rescaled by 1/keep (timm semantics)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep) if keep > 0 else x * mask


class DropPath(nn.Module):
    """Module wrapper of `drop_path`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f'p={self.drop_prob:g}'


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """F.scaled_dot_product_attention, or `explicit_attention` when it will be differentiated on a CPU.

    PyTorch's CPU flash-attention backward is slow at these sequence lengths (a 130-token step spent 12x its forward
    time there, 40 % of a demo training step). Forward passes without gradients (sampling, S-JFB's detached
    iterations) and every CUDA call keep the fused kernels.
    """
    if q.device.type == 'cpu' and q.requires_grad and torch.is_grad_enabled():
        return explicit_attention(q, k, v, mask, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale q k^T + mask) v in plain ops, whose backward is a few small matmuls.

    SDPA's math backend computes the same but also guards rows that the mask hides entirely (where / isneginf / all:
    a fwd+bwd at demo size took 22 ms there against 12 ms here); no row of a block-causal mask is hidden entirely.
    """
    scores = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


class SelfAttention(nn.Module):
    """Multi-head attention with the official q/v biases (no k bias) and optional l2-normalised q/k."""

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_l2_norm: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), INIT_SCALE_MUL).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        # Keys get no bias; the zero vector is a persistent buffer because released checkpoints contain it.
        self.register_buffer('zero_k_bias', torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x_BLC: torch.Tensor, attn_bias: Optional[torch.Tensor],
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # each B, H, L, c
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        # Under autocast the normalisation runs in fp32; attention (and the cache) use the compute dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        mask = None if attn_bias is None else attn_bias.to(q.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, mask, dropout_p, self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    """Linear - GELU (tanh by default: MLP_ACTIVATIONS) - Linear."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, act: str = 'gelu_tanh'):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = mlp_activation(act)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SharedAdaLin(nn.Linear):
    """Model-level AdaLN projection for shared_aln: cond (B,D) -> (B,1,6,C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.out_features // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm transformer block whose LayerNorm scale/shift and residual gains come from the class condition."""

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = False, mlp_act: str = 'gelu_tanh'):
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop=attn_drop, proj_drop=drop,
                                  attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop, act=mlp_act)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor],
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        # Official split order of the 6C modulation vector: gamma1, gamma2, scale1, scale2, shift1, shift2.
        if self.shared_aln:
            mods = (self.ada_gss + cond_BD).unbind(2)
        else:
            mods = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        h = self.attn(self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1), attn_bias, kv_cache)
        x_BLC = x_BLC + self.drop_path(h.mul_(gamma1))
        h = self.ffn(self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2))
        return x_BLC + self.drop_path(h.mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """Condition-modulated LayerNorm in front of the output head."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
