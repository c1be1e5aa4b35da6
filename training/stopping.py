"""The two ways a training run stops early: a signal (it saves first) and a streak of non-finite losses."""
import logging
import math
import signal
import threading
from typing import Optional

import torch
import torch.distributed as tdist

from training import dist
from training.trainer import StepResult
from utils.cli import UserError

log = logging.getLogger('viar')

DEFAULT_MAX_NONFINITE = 5    # consecutive iterations with a NaN/Inf loss before the run stops


class StopSignal:
    """SIGTERM (cluster preemption) and SIGINT (Ctrl-C) ask the training loop to finish its step, save and exit; a
    second signal interrupts at once. Ranks agree on the stop, so all of them save at the same iteration."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, device: torch.device) -> Optional[int]:
        """The signal to stop on, if any rank received one (a collective: call it at the same point on all ranks)."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return int(flag.item()) or None


class NonFiniteGuard:
    """Reports optimizer steps skipped for non-finite gradients (fp16 loss-scale overflows, NaN; AmpOptimizer skips and
    counts them) and stops the run after `patience` consecutive iterations with a NaN/Inf loss. Skipped steps leave the
    weights untouched, so the checkpoints written meanwhile hold the last good weights."""

    def __init__(self, patience: int):
        if patience < 1:
            raise UserError(f'--max_nonfinite must be >= 1, got {patience}')
        self.patience = patience
        self.streak, self.first = 0, None
        self.skipped_total, self.skipped_logged = 0, None  # AmpOptimizer's count now and at the last log line

    @property
    def skipped_since_log(self) -> int:
        return self.skipped_total - (self.skipped_logged or 0)

    def update(self, it: int, res: StepResult):
        if res.skipped_steps is not None:
            if self.skipped_logged is None:  # the first step of this process: what came before was reported
                self.skipped_logged = res.skipped_steps - (not math.isfinite(res.grad_norm))
            self.skipped_total = res.skipped_steps
        if math.isfinite(res.loss):
            self.streak = 0
            return
        if self.streak == 0:
            self.first = (res.loss, it)
        self.streak += 1
        log.warning('non-finite loss (%s) at iteration %d: its optimizer step is skipped (%d in a row; the run stops '
                    'at %d)', res.loss, it, self.streak, self.patience)
        if self.streak >= self.patience:
            loss, first_it = self.first
            raise UserError(f'the loss is {loss} at iteration {first_it} and stayed non-finite for {self.streak} '
                            f'iterations (--max_nonfinite); the weights of the last checkpoint are intact: lower '
                            f'--tblr or try --fp16 2 (bf16), then resume')
