"""Convolutional encoder and decoder of the multi-scale VQVAE (LDM/taming layout, official key names)."""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUPNORM_GROUPS = 32
GROUPNORM_EPS = 1e-6


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) as used by every VQVAE block."""
    return nn.GroupNorm(num_groups=GROUPNORM_GROUPS, num_channels=channels, eps=GROUPNORM_EPS, affine=True)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode='nearest'))


class Downsample2x(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one pixel (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, pad=(0, 1, 0, 1), mode='constant', value=0))


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice with a residual; a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.C = channels
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        qkv = self.qkv(self.norm(x_BChw)).view(B, 3, C, h * w)
        q, k, v = qkv.transpose(2, 3).unbind(dim=1)  # each B, hw, C
        out_BlC = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)
        return x_BChw + self.proj_out(out_BlC.transpose(1, 2).reshape(B, C, h, w))


class MidBlock(nn.Module):
    """ResNet block - self-attention (optional) - ResNet block at the lowest resolution (keys `mid.block_1` ...)."""

    def __init__(self, channels: int, dropout: float, using_sa: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels) if using_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


@dataclass(frozen=True)
class CoderConfig:
    """The shape of the encoder and the decoder (the official `ddconfig`): one level per entry of ch_mult."""
    z_channels: int
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    dropout: float = 0.0
    in_channels: int = 3
    using_sa: bool = True       # self-attention at the lowest resolution
    using_mid_sa: bool = True   # self-attention in the middle block


class Encoder(nn.Module):
    """Image (B,3,H,W) in [-1,1] -> latent (B,z,H/2^(levels-1),W/2^(levels-1))."""

    def __init__(self, cfg: CoderConfig):
        super().__init__()
        ch, ch_mult, num_res_blocks, dropout = cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.dropout
        self.num_resolutions = len(ch_mult)
        self.downsample_ratio = 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            is_last = i_level == self.num_resolutions - 1
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if is_last and cfg.using_sa:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if not is_last:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)

        self.mid = MidBlock(block_in, dropout, cfg.using_mid_sa)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B,z,h,w) -> image (B,3,h*2^(levels-1),w*2^(levels-1)), unclamped."""

    def __init__(self, cfg: CoderConfig):
        super().__init__()
        ch, ch_mult, num_res_blocks, dropout = cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.dropout
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = MidBlock(block_in, dropout, cfg.using_mid_sa)

        # Built from the lowest resolution up, but stored so that `up[i]` is level i (official key order).
        ups = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and cfg.using_sa:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
