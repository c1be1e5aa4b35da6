"""The VAR/VIAR trainer behind train.py: one micro-batch of teacher-forced cross-entropy (S-JFB for VIAR, the
full model or a subnet for a VARiant supernet), validation, and its part of the training checkpoint."""
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from models import VARConfig
from models.subnet import SubnetSpec
from training import dist
from training.amp import AmpOptimizer
from training.optim import Schedule
from training.supernet import Supernet
from training.trainer import StepResult
from utils.checkpoint import load_state_dict_strict, unwrap
from utils.cli import UserError
from utils.model_checkpoints import KIND_VAR, model_checkpoint

log = logging.getLogger('viar')


def token_losses(logits_BLV: torch.Tensor, gt_BL: torch.Tensor, label_smooth: float = 0.0) -> torch.Tensor:
    """Cross-entropy of every token (B, L); the training loss is its plain mean (official uniform 1/L weights)."""
    B, L, V = logits_BLV.shape
    return F.cross_entropy(logits_BLV.reshape(-1, V), gt_BL.reshape(-1), label_smoothing=label_smooth,
                           reduction='none').view(B, L)


class ARTrainer:
    """A VAR/VIAR (possibly DDP-wrapped), its frozen tokenizer and the optimizer; `step` trains one micro-batch.
    With a `supernet`, each optimizer step trains the full model or the subnet (VARiant)."""

    ckpt_kind = KIND_VAR
    val_score = 'L_tail'  # the official trainer keeps the checkpoint with the best last-scale validation loss

    def __init__(self, model: torch.nn.Module, vae, amp: AmpOptimizer, schedule: Schedule, label_smooth: float,
                 supernet: Optional[Supernet] = None, sjfb_seed: int = 0):
        self.model, self.var, self.vae = model, unwrap(model), vae
        self.amp, self.schedule, self.label_smooth = amp, schedule, label_smooth
        self.device = next(self.var.parameters()).device
        self.scale_sizes = [pn * pn for pn in self.var.patch_nums]
        self.tokens_per_image = self.var.L
        # The S-JFB draws (VIAR): the trainer's own generator, checkpointed with the other RNG streams.
        self.sjfb_rng = random.Random(sjfb_seed)
        self.rng_generators = {'sjfb': self.sjfb_rng}
        self.sjfb_draws: List[Tuple[int, int]] = []  # (no_grad_iters, grad_iters) since the last metrics
        self.supernet = supernet
        self.subnet_draws: List[Tuple[int, bool]] = []  # (optimizer step, subnet?) since the last metrics
        self.subnet_p = 0.0
        self.draws_checked = False
        if supernet is not None:
            self.val_score = 'L_tail_joint'  # VARiant aims at both: mean of the full model's and the subnet's

    def pyramid(self, batch) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(labels, per-scale token maps) of a batch of images (tokenized here) or of cached tokens."""
        x, label_B = batch
        label_B = label_B.to(self.device, non_blocking=True)
        x = x.to(self.device, non_blocking=True)
        if x.is_floating_point():
            with torch.no_grad():  # fp32 outside autocast, as the official trainer
                return label_B, self.vae.img_to_idxBl(x)
        return label_B, list(x.split(self.scale_sizes, dim=1))

    def draw_sjfb_iters(self) -> Optional[Tuple[int, int]]:
        """(no_grad_iters, grad_iters) of one training forward, drawn from the configured ranges (None for VAR)."""
        config = self.var.config
        if not config.use_implicit:
            return None
        return self.sjfb_rng.randint(*config.no_grad_iters_range), self.sjfb_rng.randint(*config.grad_iters_range)

    def step(self, it: int, batch, stepping: bool, want_metrics: bool) -> StepResult:
        """lr -> forward/backward (AMP, accumulation) -> clip -> optimizer step (when `stepping`)."""
        lr, wd = self.schedule.apply(self.amp.optimizer, it)
        label_B, gt_idx_Bl = self.pyramid(batch)
        x_BLCv = self.vae.quantize.idxBl_to_var_input(gt_idx_Bl)
        gt_BL = torch.cat(gt_idx_Bl, dim=1)
        subnet = self.pick_subnet(it, stepping)
        sjfb_iters = self.draw_sjfb_iters()
        with self.amp.forward_context(stepping):
            logits_BLV = self.model(label_B, x_BLCv, sjfb_iters=sjfb_iters, subnet=subnet)
        loss_BL = token_losses(logits_BLV, gt_BL, self.label_smooth)
        stepped = self.amp.backward_step(loss_BL.mean(), stepping)
        loss = dist.all_reduce_mean(loss_BL.detach().mean()).item()  # a non-finite loss: see TrainLoop's guard
        if sjfb_iters is not None:
            self.sjfb_draws.append(sjfb_iters)
        res = StepResult(loss, lr, wd)
        if stepped is not None:
            res.grad_norm, res.scale_log2 = stepped[0].item(), stepped[1]
            res.skipped_steps = self.amp.skipped_steps
        if want_metrics:
            res.metrics = self.metrics(loss_BL.detach(), logits_BLV.detach(), gt_BL)
            m = res.metrics
            res.summary = f'loss {m["train/L_mean"]:.4f} tail {m["train/L_tail"]:.4f} acc {m["train/acc_mean"]:.2f}%'
            if self.sjfb_draws:
                no_grad_iters, grad_iters = (sum(d[i] for d in self.sjfb_draws) / len(self.sjfb_draws)
                                             for i in range(2))
                m.update({'sjfb/no_grad_iters': no_grad_iters, 'sjfb/grad_iters': grad_iters})
                res.summary += f' | sjfb {no_grad_iters:.1f}+{grad_iters:.1f}'
                self.sjfb_draws.clear()
            if self.subnet_draws:
                res.summary += self.subnet_metrics(m)
        return res

    def pick_subnet(self, it: int, stepping: bool) -> Optional[SubnetSpec]:
        """VARiant: the subnet to train at micro-batch `it`, or None for the full model; the same on every rank and
        micro-batch of an optimizer step."""
        if self.supernet is None:
            return None
        p, use_subnet = self.supernet.draw(it)
        if stepping:
            self.subnet_draws.append((it // self.amp.accum, use_subnet))
            self.subnet_p = p
        return self.supernet.spec if use_subnet else None

    def subnet_metrics(self, metrics: Dict[str, float]) -> str:
        """Add the subnet probability and the fraction of subnet steps since the last metrics (returns the log line's
        part), after checking that every rank drew the same: a mismatch would train different architectures."""
        if not dist.same_on_all_ranks(self.subnet_draws):
            raise RuntimeError(f'ranks drew different subnet/full choices in optimizer steps '
                               f'{self.subnet_draws[0][0]}..{self.subnet_draws[-1][0]}')
        if not self.draws_checked:
            log.info('VARiant: subnet draws agree on all %d rank(s) (checked at every log step)',
                     dist.get_world_size())
            self.draws_checked = True
        used = sum(s for _, s in self.subnet_draws)
        metrics.update({'subnet/probability': self.subnet_p, 'subnet/fraction': used / len(self.subnet_draws)})
        summary = f' | subnet p {self.subnet_p:.2f}, {used}/{len(self.subnet_draws)} step(s)'
        self.subnet_draws.clear()
        return summary

    @torch.no_grad()
    def metrics(self, loss_BL: torch.Tensor, logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> Dict[str, float]:
        """Loss and accuracy (%) overall, on the last scale ('tail') and per scale, averaged over ranks."""
        ce_BL = loss_BL if self.label_smooth == 0 else token_losses(logits_BLV, gt_BL)
        acc_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float().mul_(100)
        last = self.scale_sizes[-1]
        names = ['train/L_mean', 'train/L_tail', 'train/acc_mean', 'train/acc_tail']
        values = [ce_BL.mean(), ce_BL[:, -last:].mean(), acc_BL.mean(), acc_BL[:, -last:].mean()]
        for pn, (bg, ed) in zip(self.var.patch_nums, self.var.begin_ends):
            names += [f'scale_L/{pn}x{pn}', f'scale_acc/{pn}x{pn}']
            values += [ce_BL[:, bg:ed].mean(), acc_BL[:, bg:ed].mean()]
        return dict(zip(names, dist.all_reduce_mean(torch.stack(values)).tolist()))

    @torch.no_grad()
    def evaluate(self, loader) -> Dict[str, float]:
        """Validation loss and accuracy (eval mode: no label dropout, fixed implicit iterations), over all ranks; for
        a supernet also the subnet's ('sub_' keys) and the mean of both last-scale losses."""
        self.var.eval()
        variants = {'': None}
        if self.supernet is not None:
            variants['sub_'] = self.supernet.spec
        sums = torch.zeros(len(variants), 5, device=self.device, dtype=torch.float64)
        last = self.scale_sizes[-1]
        for batch in loader:
            label_B, gt_idx_Bl = self.pyramid(batch)
            x_BLCv = self.vae.quantize.idxBl_to_var_input(gt_idx_Bl)
            gt_BL = torch.cat(gt_idx_Bl, dim=1)
            for row, subnet in enumerate(variants.values()):
                with self.amp.autocast():
                    logits_BLV = self.var(label_B, x_BLCv, subnet=subnet)
                ce_BL = token_losses(logits_BLV, gt_BL)
                acc_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float().mul_(100)
                sums[row] += torch.stack([ce_BL.mean(1).sum(), ce_BL[:, -last:].mean(1).sum(), acc_BL.mean(1).sum(),
                                          acc_BL[:, -last:].mean(1).sum(), ce_BL.new_tensor(len(gt_BL))]).double()
        if dist.is_initialized():
            torch.distributed.all_reduce(sums)
        self.var.train()
        out = {}
        for row, prefix in enumerate(variants):
            n = max(sums[row, 4].item(), 1.0)
            for col, name in enumerate(('L_mean', 'L_tail', 'acc_mean', 'acc_tail')):
                out[prefix + name] = sums[row, col].item() / n
        if self.supernet is not None:
            out['L_tail_joint'] = (out['L_tail'] + out['sub_L_tail']) / 2
        return out

    def replicated(self) -> Sequence[torch.nn.Module]:
        return [self.var]

    def checkpoint(self) -> Dict[str, Any]:
        """Weights, config, the tokenizer's config (so `load_models` rebuilds both) and the optimizer state."""
        extra = {} if self.supernet is None else {'supernet': self.supernet.config(self.var.depth)}
        return model_checkpoint(KIND_VAR, self.var, vae_config=self.vae.config.to_dict(), amp=self.amp.state_dict(),
                                **extra)

    def load_checkpoint(self, ckpt: Dict[str, Any], path: Path):
        if ckpt.get('kind') != KIND_VAR or 'amp' not in ckpt:
            raise UserError(f'{path} is not a train.py checkpoint; pass --resume none to start fresh')
        saved, own = VARConfig.current_names(ckpt['config']), self.var.config.to_dict()
        diffs = [f'{k}={v} (flags: {own[k]})' for k, v in saved.items() if own.get(k) != v]
        if diffs:
            raise UserError(f'{path} was trained with {", ".join(diffs)}; pass the same model flags (or '
                            f'--init_from) or another --out_dir')
        saved_sn = ckpt.get('supernet')
        own_sn = None if self.supernet is None else self.supernet.config(self.var.depth)
        if saved_sn is None and own_sn is not None:
            raise UserError(f'{path} was trained without --subnet_depth; to train a supernet from it, pass '
                            f'--init_from {path} and another --out_dir')
        if saved_sn is not None and saved_sn != own_sn:
            own_sn = own_sn or {}
            diffs = [f'{k}={v} (flags: {own_sn.get(k)})' for k, v in saved_sn.items() if own_sn.get(k) != v]
            raise UserError(f'{path} is a VARiant supernet checkpoint with {", ".join(diffs)}; pass the same '
                            f'--subnet_depth, --bridge, --subnet_selection and phase flags, or another --out_dir')
        load_state_dict_strict(self.var, ckpt['model'], str(path))
        self.amp.load_state_dict(ckpt['amp'])
