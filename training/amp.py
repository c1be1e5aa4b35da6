"""Mixed precision, loss scaling, gradient clipping and gradient accumulation in one object (official `amp_sc`)."""
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

PRECISIONS = ('fp32', 'fp16', 'bf16')
OFFICIAL_FP16 = {'0': 'fp32', '1': 'fp16', '2': 'bf16'}  # the official --fp16 values
AUTOCAST_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}
# GradScaler of the official recipe: start at 2^11, grow every 1000 clean steps, never above 2^15.
SCALER_INIT, SCALER_GROWTH_INTERVAL, SCALER_MAX = 2.0 ** 11, 1000, 32768.0
# VIAR: a scale collapsed below 1e-4 is reset to max(0.8 * previous reset value, 1024), growing every 2000 steps.
SCALER_RESET_BELOW, SCALER_RESET_DECAY, SCALER_RESET_MIN, SCALER_RESET_GROWTH_INTERVAL = 1e-4, 0.8, 1024.0, 2000


def official_precision(value: str) -> str:
    """argparse type for the official `--fp16 {0,1,2}` spelling."""
    if value not in OFFICIAL_FP16:
        raise ValueError(f'--fp16 takes 0 (fp32), 1 (fp16) or 2 (bf16), got {value!r}')
    return OFFICIAL_FP16[value]


def effective_precision(precision: str, device_type: str) -> str:
    """The precision a run trains in: as asked, except fp16 off CUDA, which trains in fp32 (bf16 works anywhere)."""
    # fp16 needs loss scaling and has no fast kernels on most CPUs; bf16 autocast runs on AVX-512/AMX CPUs.
    return 'fp32' if precision == 'fp16' and device_type != 'cuda' else precision


class AmpOptimizer:
    """Autocast, GradScaler (fp16 only), clipping and accumulation around one optimizer.

    Per micro-batch: `with amp.forward_context(stepping): loss = ...`, then `amp.backward_step(loss, stepping)`,
    which steps the optimizer only when `stepping` (the last micro-batch of an accumulation). A step whose gradients
    hold NaN/Inf is skipped in every precision (as GradScaler does under fp16) and counted in `skipped_steps`.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str = 'fp32',
                 grad_clip: float = 2.0, accum: int = 1):
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
        self.model, self.optimizer = model, optimizer
        self.params = [p for g in optimizer.param_groups for p in g['params']]
        self.device_type = self.params[0].device.type
        self.precision = effective_precision(precision, self.device_type)
        self.dtype = AUTOCAST_DTYPES.get(self.precision)
        self.grad_clip, self.accum = grad_clip, accum
        self.scaler = None
        if self.precision == 'fp16':
            self.scaler = torch.amp.GradScaler(self.device_type, init_scale=SCALER_INIT,
                                               growth_interval=SCALER_GROWTH_INTERVAL)
        self.reset_scale = SCALER_INIT  # what the next collapse resets to (before the decay)
        self.skipped_steps = 0
        optimizer.zero_grad(set_to_none=True)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None, cache_enabled=True)

    def forward_context(self, stepping: bool):
        """Autocast for the forward pass; under DDP gradients are all-reduced only for the micro-batch that steps."""
        if isinstance(self.model, DistributedDataParallel):
            self.model.require_backward_grad_sync = stepping
        return self.autocast()

    def backward_step(self, loss: torch.Tensor, stepping: bool) -> Optional[Tuple[torch.Tensor, Optional[float]]]:
        """Backward of loss / accum; when stepping: unscale, clip, step. Returns (pre-clip grad norm, log2 scale);
        a non-finite norm means the step was skipped."""
        loss = loss / self.accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if not stepping:
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        finite = bool(torch.isfinite(grad_norm))
        scale_log2 = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when the gradients overflowed
            self._update_scale()
            scale_log2 = math.log2(self.scaler.get_scale())
        elif finite:
            self.optimizer.step()
        self.skipped_steps += not finite
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, scale_log2

    def _update_scale(self):
        # Official quirks kept for identical fp16 dynamics: the scale is capped at 2^15, and (VIAR) a collapsed scale
        # is reset before the ordinary update, which still halves it if this step overflowed.
        scale = self.scaler.get_scale()
        if scale > SCALER_MAX:
            self.scaler.update(new_scale=SCALER_MAX)
            return
        if scale < SCALER_RESET_BELOW:
            self.reset_scale = max(SCALER_RESET_DECAY * self.reset_scale, SCALER_RESET_MIN)
            state = self.scaler.state_dict()
            state.update(scale=self.reset_scale, growth_interval=SCALER_RESET_GROWTH_INTERVAL, _growth_tracker=0)
            self.scaler.load_state_dict(state)
        self.scaler.update()

    def state_dict(self) -> Dict[str, Any]:
        return {'precision': self.precision, 'optimizer': self.optimizer.state_dict(),
                'scaler': None if self.scaler is None else self.scaler.state_dict(),
                'reset_scale': self.reset_scale, 'skipped_steps': self.skipped_steps}

    def load_state_dict(self, state: Dict[str, Any]):
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.reset_scale = state.get('reset_scale', SCALER_INIT)
        self.skipped_steps = state.get('skipped_steps', 0)
