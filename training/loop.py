"""The epoch/step loop shared by the training CLIs (logging, validation, checkpoints, the stops), and the start of
a training run."""
import contextlib
import logging
import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training import dist
from training.checkpoints import CheckpointFiles, prepare_out_dir
from training.data import stop_workers
from training.dist import check_replicas
from training.flags import check_flags, configure_backends
from training.seeds import gather_rng_states
from training.stopping import DEFAULT_MAX_NONFINITE, NonFiniteGuard, StopSignal
from training.trainer import StepResult, Trainer
from utils.cli import signal_exit_code
from utils.log import setup_logging

log = logging.getLogger('viar')

GiB = 2 ** 30


def start_run(args) -> Tuple[dist.DistInfo, Path]:
    """What every training CLI does first: join the process group, create --out_dir, log (rank 0) to its
    stdout.txt, record the command, check the flags and set the matmul backends. Returns (dist info, out_dir)."""
    info = dist.init_distributed(args.device, args.dist_timeout)
    out_dir = prepare_out_dir(args.out_dir, info.is_main)
    setup_logging(info.rank, out_dir / 'stdout.txt')
    log.info('command: %s', ' '.join(sys.argv))
    check_flags(args)
    configure_backends(args.tf32, info.device)
    return info, out_dir


def memory_gib(device: torch.device) -> float:
    """Peak memory since the last call: the CUDA allocator's peak, or the process's max RSS on the CPU."""
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) / GiB
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


class TrainLoop:
    """Epochs of steps with logging, validation and checkpoints; stops at --max_steps, after --ep epochs, after a
    SIGTERM/SIGINT (having saved), or after --max_nonfinite consecutive non-finite losses."""

    def __init__(self, args, plan, trainer: Trainer, sampler, loader, val_loader, writer, files: CheckpointFiles,
                 is_main: bool, world: int, progress: bool):
        self.args, self.plan, self.trainer = args, plan, trainer
        self.sampler, self.loader, self.val_loader = sampler, loader, val_loader
        self.writer, self.files, self.is_main, self.world, self.progress = writer, files, is_main, world, progress
        self.best = math.inf
        self.guard = NonFiniteGuard(getattr(args, 'max_nonfinite', DEFAULT_MAX_NONFINITE))
        self.stop: Optional[StopSignal] = None
        self.saved_it: Optional[int] = None

    def run(self, start_it: int, best: float) -> int:
        """Train; returns the exit code: 0, or 128 + the signal number after a signal made it save and stop."""
        # With a progress bar, log lines are printed through tqdm so that they do not tear the bar.
        try:
            with logging_redirect_tqdm([logging.getLogger()]) if self.progress else contextlib.nullcontext(), \
                    StopSignal() as self.stop:
                return self._run(start_it, best)
        finally:
            stop_workers(self.loader, self.val_loader)

    def _run(self, start_it: int, best: float) -> int:
        args, plan = self.args, self.plan
        it, self.best = start_it, best
        epoch, epoch_it = divmod(start_it, plan.iters_per_epoch)
        if args.max_steps and it >= args.max_steps:
            log.info('already at iteration %d >= --max_steps %d: nothing to do', it, args.max_steps)
            return 0
        next_log = 1 if it == 0 else (it // args.log_freq + 1) * args.log_freq  # the first iteration is always logged
        next_save = (it // args.save_steps + 1) * args.save_steps if args.save_steps else math.inf
        window_start, window_it = time.perf_counter(), it
        while epoch < args.epochs:
            self.sampler.set_epoch(epoch, epoch_it)
            bar = tqdm(total=plan.iters_per_epoch, initial=epoch_it, desc=f'ep {epoch + 1}/{args.epochs}',
                       disable=not self.progress, dynamic_ncols=True, leave=False)
            epoch_loss, epoch_steps = 0.0, 0
            for batch in self.loader:
                stepping = (it + 1) % args.accum == 0
                want_metrics = stepping and it + 1 >= next_log
                res = self.trainer.step(it, batch, stepping, want_metrics)
                it, epoch_it = it + 1, epoch_it + 1
                self.guard.update(it, res)
                epoch_loss, epoch_steps = epoch_loss + res.loss, epoch_steps + 1
                bar.update(1)
                if want_metrics:
                    self.log_step(it, epoch, epoch_it, res, time.perf_counter() - window_start, it - window_it)
                    bar.set_postfix(loss=f'{res.loss:.4f}')
                    window_start, window_it = time.perf_counter(), it
                    next_log = (it // args.log_freq + 1) * args.log_freq
                if stepping and args.max_steps and it >= args.max_steps:
                    break
                if stepping and it >= next_save:
                    self.save(it, epoch, epoch_it, is_best=False)
                    next_save = (it // args.save_steps + 1) * args.save_steps
                # At the epoch's last batch, the end-of-epoch work (validation, best checkpoint) comes first.
                if stepping and epoch_it < plan.iters_per_epoch and self.stop.requested(self.trainer.device):
                    bar.close()
                    return self.stop_on_signal(it, epoch, epoch_it)
            bar.close()
            stop = bool(args.max_steps) and it >= args.max_steps
            if epoch_it < plan.iters_per_epoch:  # --max_steps inside an epoch
                self.save(it, epoch, epoch_it, is_best=False)
                log.info('stopped at --max_steps %d', args.max_steps)
                return 0
            epoch, epoch_it = epoch + 1, 0
            mean_loss = epoch_loss / max(epoch_steps, 1)
            log.info('epoch %d/%d done: mean loss %.4f over %d it', epoch, args.epochs, mean_loss, epoch_steps)
            self.writer.write(it, {'epoch/train_loss': mean_loss}, epoch=epoch)
            if epoch % args.save_freq == 0 or epoch == args.epochs:
                self.end_of_epoch(it, epoch, mean_loss)
            if stop and epoch < args.epochs:
                if self.saved_it != it:
                    self.save(it, epoch, 0, is_best=False)
                log.info('stopped at --max_steps %d', args.max_steps)
                return 0
            if epoch < args.epochs and it % args.accum == 0 and self.stop.requested(self.trainer.device):
                return self.stop_on_signal(it, epoch, 0)
        log.info('training done after %d iterations; best %s: %.4f', it,
                 f'val {self.trainer.val_score}' if self.val_loader is not None else 'epoch loss', self.best)
        return 0

    def stop_on_signal(self, it: int, epoch: int, epoch_it: int) -> int:
        """Save (unless this iteration was just saved) and return the exit code for the signal."""
        signum = self.stop.requested(self.trainer.device)
        if self.saved_it != it:
            self.save(it, epoch, epoch_it, is_best=False)
        log.info('%s: stopped after saving iteration %d; run the same command to resume',
                    signal.Signals(signum).name, it)
        return signal_exit_code(signum)

    def end_of_epoch(self, it: int, epoch: int, train_loss: float):
        """Validate (when there is a val/ folder), then save; the best checkpoint by validation (else train) loss."""
        score = train_loss
        if self.val_loader is not None:
            val = self.trainer.evaluate(self.val_loader)
            log.info('val after epoch %d: %s', epoch, ', '.join(f'{k} {v:.4f}' for k, v in val.items()))
            self.writer.write(it, {f'val/{k}': v for k, v in val.items()}, epoch=epoch)
            score = val[self.trainer.val_score]
        if it % self.args.accum:
            log.warning('epoch %d ended inside a gradient accumulation: not saving here', epoch)
            return
        is_best = score < self.best
        self.best = min(self.best, score)
        self.save(it, epoch, 0, is_best)

    def save(self, it: int, epoch: int, epoch_it: int, is_best: bool):
        """On every rank: gather RNG states and check the replicas; rank 0 then writes the checkpoint atomically."""
        rng = gather_rng_states(self.trainer.rng_generators)
        digest = check_replicas(*self.trainer.replicated())
        if not self.is_main:
            self.saved_it = it
            return
        ckpt = self.trainer.checkpoint()
        ckpt.update(it=it, epoch=epoch, epoch_it=epoch_it, iters_per_epoch=self.plan.iters_per_epoch, best=self.best,
                    rng=rng, args=vars(self.args), world=self.world, micro_batch=self.plan.micro_batch,
                    accum=self.plan.accum)
        path = self.files.save(ckpt, is_best)
        self.saved_it = it
        log.info('saved %s at iteration %d%s; weights sha256 %s identical on %d rank(s)', path, it,
                 ' (new best)' if is_best else '', digest[:16], self.world)

    def log_step(self, it: int, epoch: int, epoch_it: int, res: StepResult, elapsed: float, iters: int):
        images_per_s = iters * self.plan.micro_batch / max(elapsed, 1e-9)
        mem = memory_gib(self.trainer.device)
        scalars = dict(res.metrics or {})
        scalars.update({'opt/lr': res.lr, 'opt/wd': res.wd, 'opt/grad_norm': res.grad_norm,
                        'opt/scale_log2': res.scale_log2, 'opt/skipped_steps': self.guard.skipped_total,
                        'speed/images_per_s': images_per_s, 'memory/peak_GiB': mem})
        speed = f'{images_per_s:.1f} img/s'
        if self.trainer.tokens_per_image:
            scalars['speed/tokens_per_s'] = images_per_s * self.trainer.tokens_per_image
            speed = f'{scalars["speed/tokens_per_s"]:.0f} tok/s'
        self.writer.write(it, scalars, epoch=epoch)
        scale = '' if res.scale_log2 is None else f' scale 2^{res.scale_log2:.0f}'
        if self.guard.skipped_since_log:
            scale += f' | {self.guard.skipped_since_log} step(s) skipped (non-finite gradients)'
        self.guard.skipped_logged = self.guard.skipped_total
        grad = 'n/a' if res.grad_norm is None else f'{res.grad_norm:.3g}'
        log.info('ep %d/%d it %d/%d (%d) | %s | lr %.3g wd %.3g | gnorm %s%s | %s | mem %.2f GiB', epoch + 1,
                 self.args.epochs, epoch_it, self.plan.iters_per_epoch, it, res.summary, res.lr, res.wd, grad, scale,
                 speed, mem)
