"""The official learning-rate and weight-decay schedules, and which parameters get weight decay."""
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

# Never decayed: every 1-D tensor, every bias, and parameters whose names contain one of these (official list).
NO_WEIGHT_DECAY_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
                        'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')
SCHEDULES = ('lin0', 'lin', 'lin00', 'cos', 'exp', 'const')
# Fraction of the post-warmup run held at the peak lr by 'lin0' and by 'lin'/'exp'.
LIN0_FLAT, LIN_FLAT = 0.05, 0.15


def param_groups(model: torch.nn.Module) -> Tuple[List[Dict], Dict[str, int]]:
    """Two AdamW groups, decayed (wd_sc=1) and not (wd_sc=0), plus the parameter count of each for the log."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith('bias') or any(k in name for k in NO_WEIGHT_DECAY_KEYS)
        (no_decay if skip else decay).append(p)
    groups = [{'params': decay, 'wd_sc': 1.0, 'lr_sc': 1.0}, {'params': no_decay, 'wd_sc': 0.0, 'lr_sc': 1.0}]
    counts = {'decay': sum(p.numel() for p in decay), 'no_decay': sum(p.numel() for p in no_decay)}
    return [g for g in groups if g['params']], counts


def adamw(groups: List[Dict], peak_lr: float, betas, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over `groups` (weight decay comes from the schedule). `fused` runs one kernel over all parameters, on a
    CPU as on CUDA; PyTorch's default on a CPU is a Python loop over the tensors, about 5x slower on the demo's
    models (10 ms of a 250 ms step)."""
    return torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(betas), weight_decay=0.0, fused=fused)


def lr_factor(it: int, warmup_iters: int, max_iters: int, schedule: str = 'lin0', warmup_start: float = 0.005,
              final: float = 0.01) -> float:
    """Multiplier of the peak lr at iteration `it`: linear warmup from `warmup_start`, then `schedule` down to `final`
    at the last iteration ('lin0': flat for 5% of the rest, then linear; 'const': the peak lr after warmup)."""
    if it < warmup_iters:
        return warmup_start + (1 - warmup_start) * it / warmup_iters
    progress = (it - warmup_iters) / max(max_iters - 1 - warmup_iters, 1)
    rest = 1 - progress
    if schedule == 'const':
        return 1.0
    if schedule == 'cos':
        return final + (1 - final) * (0.5 + 0.5 * math.cos(math.pi * progress))
    if schedule == 'lin00':
        return final + (1 - final) * rest
    if schedule in ('lin', 'lin0'):
        flat = LIN0_FLAT if schedule == 'lin0' else LIN_FLAT
        return 1.0 if progress < flat else final + (1 - final) * rest / (1 - flat)
    if schedule == 'exp':
        return 1.0 if progress < LIN_FLAT else math.exp((progress - LIN_FLAT) / (1 - LIN_FLAT) * math.log(final))
    raise ValueError(f'unknown lr schedule {schedule!r}; choose from {SCHEDULES}')


def weight_decay_at(it: int, max_iters: int, start: float, end: float) -> float:
    """Cosine from `start` to `end` over the whole run (VIAR's recipe ramps it up, 0.05 -> 0.08)."""
    progress = it / max(max_iters - 1, 1)
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """Peak lr and weight decay over `max_iters` iterations; `apply` writes an iteration's values into an optimizer."""
    peak_lr: float
    warmup_iters: int
    max_iters: int
    schedule: str = 'lin0'
    warmup_start: float = 0.005
    final: float = 0.01
    wd: float = 0.05
    wd_end: float = 0.05

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f'unknown lr schedule {self.schedule!r}; choose from {SCHEDULES}')

    def at(self, it: int) -> Tuple[float, float]:
        """(lr, weight decay) at iteration `it`."""
        lr = self.peak_lr * lr_factor(it, self.warmup_iters, self.max_iters, self.schedule, self.warmup_start,
                                      self.final)
        return lr, weight_decay_at(it, self.max_iters, self.wd, self.wd_end)

    def apply(self, optimizer: torch.optim.Optimizer, it: int) -> Tuple[float, float]:
        lr, wd = self.at(it)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_sc', 1.0)
            group['weight_decay'] = wd * group.get('wd_sc', 1.0)
        return lr, wd
