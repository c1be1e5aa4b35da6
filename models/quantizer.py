"""Multi-scale residual vector quantizer with the (partially shared) Phi refinement convs."""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

# EMA rates of the per-scale code-hit counters: fast for the first records, then slow.
EMA_WARM_RECORDS, EMA_WARM_DECAY, EMA_DECAY = 100, 0.9, 0.99
# A code counts as "used" when its EMA hit count reaches this fraction of the uniform expectation.
USAGE_MARGIN = 0.08


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which of `num_phi` Phi convs serves scale `si` of `num_scales`: the nearest tick to si/(num_scales-1).

    Ties (e.g. scales 2 and 7 of 10 with 4 convs) are decided by float64 rounding exactly as the official
    numpy code does, which is what the released checkpoints were trained with.
    """
    if num_scales < 2:
        raise ValueError(f'multi-scale quantization needs at least 2 scales, got {num_scales}')
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    ticks = np.linspace(margin, 1 - margin, num_phi)
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


class Phi(nn.Conv2d):
    """Residual refinement Phi(h) = (1-r)*h + r*conv3x3(h) applied to each scale's upsampled embedding."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _make_phi(channels: int, quant_resi: float) -> nn.Module:
    return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """One Phi for every scale (share_quant_resi=1); key prefix `qresi`."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """A few Phi convs spread over the scales (share_quant_resi>1, the released setting); prefix `qresi_ls`."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(si, num_scales, len(self.qresi_ls))]


class PhiNonShared(nn.ModuleList):
    """One Phi per scale (share_quant_resi=0); keys directly under the list index."""

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self[phi_index(si, num_scales, len(self))]


class MultiScaleQuantizer(nn.Module):
    """Residual quantization of a latent map into a pyramid of token maps, one per entry of `patch_nums`."""

    def __init__(self, vocab_size: int, Cvae: int, patch_nums: Sequence[int], using_znorm: bool = False,
                 beta: float = 0.25, default_qresi_counts: int = 0, quant_resi: float = 0.5,
                 share_quant_resi: int = 4):
        super().__init__()
        if len(patch_nums) < 2:
            raise ValueError(f'patch_nums needs at least 2 scales, got {tuple(patch_nums)}')
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.using_znorm, self.beta = using_znorm, beta
        self.v_patch_nums = tuple(patch_nums)
        if share_quant_resi == 0:
            n = default_qresi_counts or len(self.v_patch_nums)
            self.quant_resi = PhiNonShared([_make_phi(Cvae, quant_resi) for _ in range(n)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(Cvae, quant_resi))
        else:
            phis = nn.ModuleList([_make_phi(Cvae, quant_resi) for _ in range(share_quant_resi)])
            self.quant_resi = PhiPartiallyShared(phis)
        self.embedding = nn.Embedding(vocab_size, Cvae)
        # Per-scale EMA of code hits; persistent because it is part of the released state dicts.
        self.register_buffer('ema_vocab_hit_SV', torch.full((len(self.v_patch_nums), vocab_size), fill_value=0.0))
        self.record_hit = 0

    @property
    def num_scales(self) -> int:
        return len(self.v_patch_nums)

    def phi(self, si: int, num_scales: Optional[int] = None) -> nn.Module:
        """The Phi module applied to scale `si`."""
        return self.quant_resi.for_scale(si, num_scales or self.num_scales)

    def init_vocab(self, eini: float):
        """Codebook init: trunc-normal with std |eini| if eini<0, uniform(+-eini/V) if eini>0, untouched if 0."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight.data, std=eini)
        elif eini < 0:
            self.embedding.weight.data.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    # ---- nearest-code search -------------------------------------------------------------------------------------
    def _nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for each row of z_NC (first index on ties)."""
        E_VC = self.embedding.weight.detach()
        if self.using_znorm:
            sim = F.normalize(z_NC, dim=-1) @ F.normalize(E_VC, dim=-1).T
            return torch.argmax(sim, dim=1)
        # |z|^2 + |e|^2 - 2 z.e through addmm, as the official code does, so near-ties resolve identically.
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E_VC.square(), dim=1, keepdim=False)
        d_NV.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    @staticmethod
    def _scale_residual(f_rest: torch.Tensor, pn_hw: Tuple[int, int], is_last: bool) -> torch.Tensor:
        """Rows (B*ph*pw, C) of the residual area-pooled to one scale (the last scale uses it unpooled)."""
        C = f_rest.shape[1]
        if not is_last:
            f_rest = F.interpolate(f_rest, size=pn_hw, mode='area')
        return f_rest.permute(0, 2, 3, 1).reshape(-1, C)

    def _scale_embed_up(self, idx_Bhw: torch.Tensor, si: int, HW: Tuple[int, int], SN: int) -> torch.Tensor:
        """Embed scale-si indices, bicubic-upsample to the full latent size (not the last scale) and apply Phi."""
        h_BChw = self.embedding(idx_Bhw).permute(0, 3, 1, 2)
        if si != SN - 1:
            h_BChw = F.interpolate(h_BChw, size=HW, mode='bicubic')
        return self.phi(si, SN)(h_BChw.contiguous())

    # ---- training forward ----------------------------------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False):
        """Quantize with straight-through gradients: returns (f_hat, per-scale usage % or None, VQ loss)."""
        f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        SN = len(self.v_patch_nums)
        if self.v_patch_nums[-1] != H or H != W:
            raise ValueError(f'latent {H}x{W} does not match the last patch_num {self.v_patch_nums[-1]}')
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            mean_vq_loss = f_BChw.new_zeros(())
            for si, pn in enumerate(self.v_patch_nums):
                idx_N = self._nearest_code(self._scale_residual(f_rest, (pn, pn), si == SN - 1))
                h_BChw = self._scale_embed_up(idx_N.view(B, pn, pn), si, (H, W), SN)
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                if self.training:
                    self._record_hits(si, idx_N, world)
                mean_vq_loss = mean_vq_loss + F.mse_loss(f_hat.detach(), f_BChw).mul(self.beta) \
                    + F.mse_loss(f_hat, f_no_grad)
            mean_vq_loss = mean_vq_loss / SN
            f_hat = (f_hat.detach() - f_no_grad) + f_BChw  # straight-through estimator
        usages = self.usages(B * world) if ret_usages else None
        return f_hat, usages, mean_vq_loss

    @torch.no_grad()
    def _record_hits(self, si: int, idx_N: torch.Tensor, world: int):
        hit_V = idx_N.bincount(minlength=self.vocab_size).float()
        if world > 1:
            tdist.all_reduce(hit_V)
        if self.record_hit < len(self.v_patch_nums):
            self.ema_vocab_hit_SV[si].copy_(hit_V)
        else:
            decay = EMA_WARM_DECAY if self.record_hit < EMA_WARM_RECORDS * len(self.v_patch_nums) else EMA_DECAY
            self.ema_vocab_hit_SV[si].mul_(decay).add_(hit_V.mul(1 - decay))
        self.record_hit += 1

    def usages(self, global_batch: int) -> List[float]:
        """Per scale, the % of codes whose EMA hit count reaches 8% of a uniform share of that scale's tokens."""
        out = []
        for si, pn in enumerate(self.v_patch_nums):
            margin = global_batch * pn * pn / self.vocab_size * USAGE_MARGIN
            out.append((self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100)
        return out

    # ---- tokenization --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Optional[Sequence] = None) -> List[torch.Tensor]:
        """Encode a latent to per-scale indices (B, ph*pw) or, with to_fhat, to the cumulative f_hat per scale."""
        B, C, H, W = f_BChw.shape
        patch_hws = [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in (v_patch_nums or self.v_patch_nums)]
        if patch_hws[-1] != (H, W):
            raise ValueError(f'latent {H}x{W} does not match the last patch_num {patch_hws[-1]}')
        SN = len(patch_hws)
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        for si, (ph, pw) in enumerate(patch_hws):
            idx_N = self._nearest_code(self._scale_residual(f_rest, (ph, pw), si == SN - 1))
            h_BChw = self._scale_embed_up(idx_N.view(B, ph, pw), si, (H, W), SN)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    # ---- decoding helpers ----------------------------------------------------------------------------------------
    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False):
        """Accumulate per-scale embeddings (B,Cvae,pn,pn) into f_hat; a list per scale unless `last_one`.

        `all_to_max_scale=True` is the released rule (upsample each scale to full size, Phi, add); False is the
        official experimental variant that grows f_hat progressively (bicubic-upsample f_hat itself, add Phi(h)).
        Fewer scales than `patch_nums` may be given (a partial pyramid).
        """
        B = ms_h_BChw[0].shape[0]
        HW = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        ls_f_hat = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, HW, HW, dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                if si < SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(HW, HW), mode='bicubic')
                f_hat.add_(self.phi(si)(h_BChw))
                ls_f_hat.append(f_hat.clone())
        else:
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                pn = self.v_patch_nums[si]
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode='bicubic')
                f_hat = f_hat + self.phi(si)(h_BChw)
                ls_f_hat.append(f_hat)
        return ls_f_hat[-1] if last_one else ls_f_hat

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """Teacher-forcing input (B, L - first_l, Cvae): f_hat after scales 0..k-1, area-pooled to scale k."""
        B = gt_ms_idx_Bl[0].shape[0]
        C, HW, SN = self.Cvae, self.v_patch_nums[-1], len(self.v_patch_nums)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, HW, HW, dtype=torch.float32)
        next_scales = []
        for si in range(SN - 1):
            pn = self.v_patch_nums[si]
            h_BChw = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat.add_(self.phi(si)(F.interpolate(h_BChw, size=(HW, HW), mode='bicubic')))
            pn_next = self.v_patch_nums[si + 1]
            pooled = F.interpolate(f_hat, size=(pn_next, pn_next), mode='area')
            next_scales.append(pooled.view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor,
                                      h_BChw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's embedding to f_hat (in place) and return (f_hat, next scale's input map)."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(HW, HW), mode='bicubic')))
            pn_next = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode='area')
        f_hat.add_(self.phi(si, SN)(h_BChw))
        return f_hat, f_hat
