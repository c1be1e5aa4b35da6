"""The tokenizer trainer behind train_tokenizer.py: one micro-batch of reconstruction, VQ, LPIPS and PatchGAN losses,
dead-code restarts, validation, and its part of the training checkpoint."""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from models import VQVAE
from models.discriminator import hinge_d_loss, hinge_g_loss
from models.lpips import LPIPS
from models.quantizer import USAGE_MARGIN, MultiScaleQuantizer
from training import dist
from training.amp import AmpOptimizer
from training.optim import Schedule
from training.trainer import StepResult
from utils.checkpoint import load_state_dict_strict, unwrap
from utils.cli import UserError
from utils.model_checkpoints import KIND_VQVAE, model_checkpoint

log = logging.getLogger('viar')

PSNR_RANGE = 2.0  # images live in [-1, 1]


def all_phis_used(q: MultiScaleQuantizer) -> bool:
    """Whether every Phi conv serves some scale (DDP must look for unused parameters otherwise)."""
    used = {id(q.phi(si)) for si in range(q.num_scales)}
    return all(id(m) in used for m in q.quant_resi.modules() if any(True for _ in m.parameters(recurse=False)))


def residual_rows(q: MultiScaleQuantizer, f_BChw: torch.Tensor) -> torch.Tensor:
    """Every scale's quantizer input (the pooled residual) as rows (N, Cvae): candidates for restarted codes."""
    f_hats = q.f_to_idxBl_or_fhat(f_BChw, to_fhat=True)
    rows = []
    for si, pn in enumerate(q.v_patch_nums):
        rest = f_BChw if si == 0 else f_BChw - f_hats[si - 1]
        rows.append(MultiScaleQuantizer._scale_residual(rest, (pn, pn), si == q.num_scales - 1))
    return torch.cat(rows)


@dataclass(frozen=True)
class LossWeights:
    rec_l2: float
    rec_l1: float
    lpips: float
    gan_g: float


class TokenizerTrainer:
    """The tokenizer (possibly DDP-wrapped) with its optimizer, and optionally LPIPS and a discriminator."""

    ckpt_kind = KIND_VQVAE
    val_score = 'rec_l2'
    tokens_per_image = None

    def __init__(self, model: torch.nn.Module, amp: AmpOptimizer, schedule: Schedule, weights: LossWeights,
                 lpips: Optional[LPIPS], disc: Optional[torch.nn.Module], disc_amp: Optional[AmpOptimizer],
                 disc_start: int, restart_every: int, dead_threshold: float, micro_batch: int):
        self.model = model
        self.vae: VQVAE = unwrap(model)
        self.amp, self.schedule, self.weights, self.lpips = amp, schedule, weights, lpips
        self.disc, self.disc_amp, self.disc_start = disc, disc_amp, disc_start
        self.disc_raw = None if disc is None else unwrap(disc)
        self.restart_every, self.dead_threshold, self.micro_batch = restart_every, dead_threshold, micro_batch
        self.device = next(self.vae.parameters()).device
        self.rng_generators = {}
        self.restarted = 0  # codes restarted since the last metrics

    def step(self, it: int, batch, stepping: bool, want_metrics: bool) -> StepResult:
        """lr -> forward/backward of the tokenizer -> step; then the discriminator's step; then dead-code restarts."""
        lr, wd = self.schedule.apply(self.amp.optimizer, it)
        img = batch[0].to(self.device, non_blocking=True)
        gan_on = self.disc is not None and it >= self.disc_start
        with self.amp.forward_context(stepping):
            rec, usages, vq_loss = self.model(img, ret_usages=want_metrics)
            terms = {'rec_l2': F.mse_loss(rec.float(), img), 'rec_l1': F.l1_loss(rec.float(), img), 'vq': vq_loss}
            if self.lpips is not None:
                terms['lpips'] = self.lpips(rec, img).mean()
            if gan_on:
                # The discriminator judges with detached weights: this loss trains only the tokenizer.
                frozen = {k: v.detach() for k, v in self.disc_raw.named_parameters()}
                terms['gan_g'] = hinge_g_loss(torch.func.functional_call(self.disc_raw, frozen, (rec,)))
        loss = terms['vq'] + sum(getattr(self.weights, k) * v for k, v in terms.items() if k != 'vq')
        stepped = self.amp.backward_step(loss, stepping)
        if gan_on:
            self.schedule.apply(self.disc_amp.optimizer, it)
            with self.disc_amp.forward_context(stepping):
                logits_real, logits_fake = self.disc(torch.cat((img, rec.detach()))).chunk(2)
            terms['gan_d'] = hinge_d_loss(logits_real, logits_fake)
            self.disc_amp.backward_step(terms['gan_d'], stepping)
            terms.update(logit_real=logits_real.detach().float().mean(), logit_fake=logits_fake.detach().float().mean())
        if stepping and self.restart_every and (it + 1) % self.restart_every == 0:
            self.restarted += self.restart_dead_codes(img)

        loss_value = dist.all_reduce_mean(loss.detach().float()).item()  # a non-finite loss: see TrainLoop's guard
        res = StepResult(loss_value, lr, wd)
        if stepped is not None:
            res.grad_norm, res.scale_log2 = stepped[0].item(), stepped[1]
            res.skipped_steps = self.amp.skipped_steps
        if want_metrics:
            res.metrics, res.summary = self.metrics(terms, usages)
        return res

    def code_usage(self) -> float:
        """% of codes whose hit rate (EMA over all scales) reaches the quantizer's 'used' margin."""
        q = self.vae.quantize
        uniform = self.micro_batch * sum(pn * pn for pn in q.v_patch_nums) / q.vocab_size
        return (q.ema_vocab_hit_SV.sum(0) >= USAGE_MARGIN * uniform).float().mean().item() * 100

    def metrics(self, terms: Dict[str, torch.Tensor], usages: Optional[List[float]]) -> Tuple[Dict[str, float], str]:
        names = sorted(terms)
        values = dist.all_reduce_mean(torch.stack([terms[k].detach().float() for k in names])).tolist()
        m = {f'loss/{k}': v for k, v in zip(names, values)}
        usage = self.code_usage()
        m.update({'codes/used_pct': usage, 'codes/restarted': float(self.restarted)})
        for pn, u in zip(self.vae.quantize.v_patch_nums, usages or []):
            m[f'codes/used_pct_{pn}x{pn}'] = u
        extra = ''.join(f' {k} {m[f"loss/{k}"]:.4f}' for k in ('lpips', 'gan_g', 'gan_d') if k in terms)
        summary = (f'rec {m["loss/rec_l2"]:.4f} l1 {m["loss/rec_l1"]:.4f} vq {m["loss/vq"]:.4f}{extra} | codes '
                   f'{usage:.1f}% used, {self.restarted} restarted')
        self.restarted = 0
        return m, summary

    @torch.no_grad()
    def restart_dead_codes(self, img: torch.Tensor) -> int:
        """Re-initialise codes whose hit rate fell below the threshold from random quantizer inputs of this batch.

        The hit EMA is all-reduced, so every rank finds the same dead codes; rank 0's picks are broadcast, so the
        codebooks stay identical. Their Adam moments are zeroed and their EMA set to a uniform share (a grace period).
        """
        q = self.vae.quantize
        uniform_SV = torch.tensor([self.micro_batch * pn * pn / q.vocab_size for pn in q.v_patch_nums],
                                  device=self.device)
        dead = q.ema_vocab_hit_SV.sum(0) < self.dead_threshold * uniform_SV.sum()
        n = int(dead.sum())
        if n == 0:
            return 0
        rows = residual_rows(q, self.vae.quant_conv(self.vae.encoder(img)).float())
        new = rows[torch.randint(len(rows), (n,), device=rows.device)]
        if dist.is_initialized():
            tdist.broadcast(new, src=0)
        q.embedding.weight[dead] = new.to(q.embedding.weight.dtype)
        q.ema_vocab_hit_SV[:, dead] = uniform_SV[:, None]
        state = self.amp.optimizer.state.get(q.embedding.weight, {})
        for key in ('exp_avg', 'exp_avg_sq'):
            if key in state:
                state[key][dead] = 0
        return n

    @torch.no_grad()
    def evaluate(self, loader) -> Dict[str, float]:
        """Reconstruction L2 / L1 / PSNR and the % of codes used over the validation set, over all ranks."""
        self.vae.eval()
        q = self.vae.quantize
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        hits_V = torch.zeros(q.vocab_size, device=self.device)
        for img, _ in loader:
            img = img.to(self.device, non_blocking=True)
            with self.amp.autocast():
                rec = self.vae(img)[0].float()
            mse_B = (rec - img).square().mean(dim=(1, 2, 3))
            psnr_B = 10 * torch.log10(PSNR_RANGE ** 2 / (rec.clamp(-1, 1) - img).square().mean(dim=(1, 2, 3)))
            sums += torch.stack([mse_B.sum(), (rec - img).abs().mean(dim=(1, 2, 3)).sum(), psnr_B.sum(),
                                 mse_B.new_tensor(len(img))]).double()
            hits_V += torch.cat(self.vae.img_to_idxBl(img), dim=1).flatten().bincount(minlength=q.vocab_size)
        if dist.is_initialized():
            tdist.all_reduce(sums)
            tdist.all_reduce(hits_V)
        self.vae.train()
        n = max(sums[3].item(), 1.0)
        return {'rec_l2': sums[0].item() / n, 'rec_l1': sums[1].item() / n, 'psnr': sums[2].item() / n,
                'codes_used_pct': (hits_V > 0).float().mean().item() * 100}

    def replicated(self) -> Sequence[torch.nn.Module]:
        return [self.vae] + ([self.disc_raw] if self.disc_raw is not None else [])

    def checkpoint(self) -> Dict[str, Any]:
        """The tokenizer (loadable by `load_vae`), its optimizer, the discriminator and the quantizer's EMA clock."""
        extra = {'amp': self.amp.state_dict(), 'record_hit': self.vae.quantize.record_hit}
        if self.disc_raw is not None:
            extra.update(disc=self.disc_raw.state_dict(), disc_amp=self.disc_amp.state_dict())
        return model_checkpoint(KIND_VQVAE, self.vae, **extra)

    def load_checkpoint(self, ckpt: Dict[str, Any], path: Path):
        if ckpt.get('kind') != KIND_VQVAE or 'amp' not in ckpt:
            raise UserError(f'{path} is not a train_tokenizer.py checkpoint; pass --resume none to start fresh')
        own = self.vae.config.to_dict()
        diffs = [f'{k}={v} (flags: {own[k]})' for k, v in ckpt['config'].items() if own.get(k) != v]
        if diffs:
            raise UserError(f'{path} was trained with {", ".join(diffs)}; pass the same flags or another --out_dir')
        if (self.disc_raw is None) != ('disc' not in ckpt):
            raise UserError(f'{path} was trained {"with" if "disc" in ckpt else "without"} a discriminator; match '
                            f'--gan_weight or use another --out_dir')
        load_state_dict_strict(self.vae, ckpt['model'], str(path))
        self.amp.load_state_dict(ckpt['amp'])
        self.vae.quantize.record_hit = ckpt['record_hit']
        if self.disc_raw is not None:
            load_state_dict_strict(self.disc_raw, ckpt['disc'], f'{path} (discriminator)')
            self.disc_amp.load_state_dict(ckpt['disc_amp'])
