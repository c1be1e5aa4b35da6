"""The multi-scale VQVAE tokenizer: encoder, multi-scale quantizer, decoder, and its preset registry."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .config_base import ConfigBase
from .quantizer import MultiScaleQuantizer
from .vae_nets import CoderConfig, Decoder, Encoder

DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class VQVAEConfig(ConfigBase):
    """Everything needed to rebuild a tokenizer; defaults are the released vae_ch160v4096z32."""
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    patch_nums: Tuple[int, ...] = DEFAULT_PATCH_NUMS
    using_sa: bool = True
    using_mid_sa: bool = True

    def __post_init__(self):
        if len(self.patch_nums) < 2 or any(p <= 0 for p in self.patch_nums):
            raise ValueError(f'patch_nums must hold at least 2 positive sizes, got {self.patch_nums}')
        if list(self.patch_nums) != sorted(self.patch_nums):
            raise ValueError(f'patch_nums must be increasing (coarse to fine), got {self.patch_nums}')
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(f'VQVAE channel widths {bad} are not divisible by GroupNorm\'s 32 groups')

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor],
                        patch_nums: Optional[Sequence[int]] = None) -> 'VQVAEConfig':
        """Recover the architecture of a bare (e.g. released) tokenizer state dict from its keys and shapes.

        The scale sizes are not stored in a tokenizer checkpoint (only their count); pass `patch_nums` unless the
        checkpoint has the released 10 scales.
        """
        try:
            vocab_size, z_channels = sd['quantize.embedding.weight'].shape
            ch = sd['encoder.conv_in.weight'].shape[0]
            num_scales = sd['quantize.ema_vocab_hit_SV'].shape[0]
        except KeyError as e:
            raise ValueError(f'not a VQVAE state dict: key {e} is missing') from None

        def indices(prefix: str) -> List[int]:
            return sorted({int(k[len(prefix):].split('.')[0]) for k in sd if k.startswith(prefix)})

        levels = indices('encoder.down.')
        ch_mult = tuple(sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch for i in levels)
        num_res_blocks = len(indices('encoder.down.0.block.'))
        phis = [k for k in sd if k.startswith('quantize.quant_resi.') and k.endswith('.weight')]
        if any(k.startswith('quantize.quant_resi.qresi_ls.') for k in phis):
            share, counts = len(indices('quantize.quant_resi.qresi_ls.')), 0
        elif 'quantize.quant_resi.qresi.weight' in sd:
            share, counts = 1, 0
        elif phis:
            share, counts = 0, len(indices('quantize.quant_resi.'))
        else:
            share, counts = 4, 0
        if patch_nums is None:
            if num_scales != len(DEFAULT_PATCH_NUMS):
                raise ValueError(f'the tokenizer checkpoint was trained with {num_scales} scales; pass its patch_nums')
            patch_nums = DEFAULT_PATCH_NUMS
        return cls(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult,
                   num_res_blocks=num_res_blocks, quant_resi=0.5 if phis else 0.0, share_quant_resi=share,
                   default_qresi_counts=counts if counts != len(patch_nums) else 0,
                   quant_conv_ks=sd['quant_conv.weight'].shape[-1], patch_nums=tuple(patch_nums),
                   using_sa=f'encoder.down.{levels[-1]}.attn.0.norm.weight' in sd,
                   using_mid_sa='encoder.mid.attn_1.norm.weight' in sd)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """Pixel side of the images this tokenizer encodes: last patch_num times the downsampling factor."""
        return self.patch_nums[-1] * self.downsample


class VQVAE(nn.Module):
    """Multi-scale VQVAE: image <-> pyramid of token maps (official `VQVAE` interface and key names)."""

    def __init__(self, config: VQVAEConfig = VQVAEConfig()):
        super().__init__()
        self.config = config
        self.V, self.Cvae = config.vocab_size, config.z_channels
        self.downsample = config.downsample
        coder = CoderConfig(ch=config.ch, ch_mult=tuple(config.ch_mult), num_res_blocks=config.num_res_blocks,
                            dropout=config.dropout, z_channels=config.z_channels, using_sa=config.using_sa,
                            using_mid_sa=config.using_mid_sa)
        self.encoder = Encoder(coder)
        self.decoder = Decoder(coder)
        self.quantize = MultiScaleQuantizer(
            vocab_size=config.vocab_size, Cvae=config.z_channels, patch_nums=config.patch_nums,
            using_znorm=config.using_znorm, beta=config.beta, default_qresi_counts=config.default_qresi_counts,
            quant_resi=config.quant_resi, share_quant_resi=config.share_quant_resi)
        ks = config.quant_conv_ks
        self.quant_conv = nn.Conv2d(self.Cvae, self.Cvae, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(self.Cvae, self.Cvae, ks, stride=1, padding=ks // 2)

    def freeze(self) -> 'VQVAE':
        """Eval mode with frozen parameters, as the AR models use the tokenizer (official `test_mode`)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, inp_B3HW: torch.Tensor, ret_usages: bool = False):
        """Training pass: (reconstruction, per-scale code usage % or None, VQ loss)."""
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp_B3HW)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Decode an accumulated latent to an image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_B3HW: torch.Tensor, v_patch_nums: Optional[Sequence] = None) -> List[torch.Tensor]:
        """Image in [-1, 1] -> list over scales of token indices (B, pn*pn)."""
        f = self.quant_conv(self.encoder(inp_B3HW))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: List[torch.Tensor], same_shape: bool = True, last_one: bool = False):
        """Token pyramid (possibly only its first scales) -> image(s) in [-1, 1]; one per scale unless last_one."""
        B = ms_idx_Bl[0].shape[0]
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one: bool = False):
        """Per-scale embeddings -> image(s) in [-1, 1]."""
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        if last_one:
            return self.fhat_to_img(f_hats)
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def img_to_reconstructed_img(self, x_B3HW: torch.Tensor, v_patch_nums: Optional[Sequence] = None,
                                 last_one: bool = False):
        """Encode then decode: the reconstruction after each scale, or only after all of them."""
        f = self.quant_conv(self.encoder(x_B3HW))
        f_hats = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def adapt_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Kept from the official VQVAE: a checkpoint whose code-usage EMA was recorded for a different number of
        scales still loads; that buffer then starts from zeros."""
        key = 'quantize.ema_vocab_hit_SV'
        own = self.quantize.ema_vocab_hit_SV
        if key in state_dict and state_dict[key].shape[0] != own.shape[0]:
            state_dict = dict(state_dict)
            state_dict[key] = torch.zeros(own.shape, dtype=own.dtype)
        return state_dict

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        return super().load_state_dict(self.adapt_state_dict(state_dict), strict=strict, assign=assign)


VQVAE_PRESETS: Dict[str, VQVAEConfig] = {
    # The released tokenizer (vae_ch160v4096z32.pth), 256px images -> 16x16 latents.
    'vae-ch160v4096z32': VQVAEConfig(),
    # The CPU demo's tokenizer: 32px Fashion-MNIST -> 8x8 latents, 6 scales, 256 codes (about 1M parameters; the demo
    # widens the latent to 32 channels with --z_channels 32).
    'vae-demo-fmnist32': VQVAEConfig(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                     patch_nums=(1, 2, 3, 4, 6, 8)),
    # The same at 16x16 latents: sharper reconstructions for the same iterations (bench/results/tokenizer_study.md),
    # but 359 instead of 130 tokens per image for the transformer, too many for the demo's 15 minutes.
    'vae-demo-fmnist32-16': VQVAEConfig(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                        patch_nums=(1, 2, 3, 5, 8, 16)),
}
