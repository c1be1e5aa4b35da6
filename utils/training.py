"""Plumbing shared by the training CLIs: seeds and RNG states, the output folder, checkpoint files and resuming, a
check that every rank holds the same weights, and the epoch/step loop with logging, validation and saving."""
import contextlib
import hashlib
import logging
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils import dist
from utils.checkpoint import link_atomic, load_file, save_atomic
from utils.cli import UserError

log = logging.getLogger('viar')

RESUME_NONE = ('none', 'no', '')
GiB = 2 ** 30
# Independent seed streams derived from --seed.
STREAM_INIT, STREAM_RANK, STREAM_DATA, STREAM_SJFB, STREAM_SUBNET = 0, 1, 2, 3, 4


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (e.g. seed, stream, rank)."""
    if any(v < 0 for v in values):
        raise ValueError(f'seeds must be >= 0, got {values}')
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_process(seed: int, rank: int):
    """Seed torch (CPU and CUDA), numpy and `random` for this rank."""
    s = mix_seed(seed, STREAM_RANK, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2 ** 32)


# ---- RNG states (stored as tensors and tuples of ints: checkpoints are loaded with weights_only=True) -------------
def rng_state(generators: Dict[str, random.Random]) -> Dict[str, Any]:
    """This process's RNG states: torch CPU/CUDA, `random`, numpy, and the given `random.Random`s."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                       'cached_gaussian': float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    for key, gen in generators.items():
        state[key] = gen.getstate()
    return state


def set_rng_state(state: Dict[str, Any], generators: Dict[str, random.Random]):
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state['torch'])
    random.setstate(_as_tuple(state['python']))
    npy = state['numpy']
    np.random.set_state(('MT19937', npy['keys'].numpy().astype(np.uint32), npy['pos'], npy['has_gauss'],
                         npy['cached_gaussian']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
    for key, gen in generators.items():
        gen.setstate(_as_tuple(state[key]))


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def gather_rng_states(generators: Dict[str, random.Random]) -> List[Dict[str, Any]]:
    """Every rank's RNG states, in rank order (the same list on all ranks)."""
    mine = rng_state(generators)
    if not dist.is_initialized():
        return [mine]
    out: List[Any] = [None] * dist.get_world_size()
    tdist.all_gather_object(out, mine)
    return out


def restore_rng_states(states: Optional[List[Dict[str, Any]]], generators: Dict[str, random.Random], seed: int,
                       rank: int, world: int, step: int):
    """Continue this rank's random streams from a checkpoint; if it was written by a different number of ranks,
    re-seed from (seed, step, rank) instead (the run goes on, but not bit-identically)."""
    if states is not None and len(states) == world:
        set_rng_state(states[rank], generators)
        return
    log.warning('checkpoint holds RNG states of %s rank(s), this run has %d: re-seeding (not bit-exact resume)',
                'no' if states is None else len(states), world)
    seed_process(mix_seed(seed, step), rank)
    for i, gen in enumerate(generators.values()):
        gen.seed(mix_seed(seed, step, rank, i))


# ---- output folder, checkpoint files, resume -----------------------------------------------------------------------
def prepare_out_dir(path, is_main: bool) -> Path:
    """Create the output folder (rank 0) and make sure it is writable."""
    path = Path(path)
    if is_main:
        probe = path / '.write_test'
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_text('ok')
            probe.unlink()
        except OSError as e:
            raise UserError(f'output folder {path} is not writable ({e.strerror or e})') from None
    return path


class CheckpointFiles:
    """`{prefix}-ckpt-last.pth` (written atomically) and `{prefix}-ckpt-best.pth` (a link to the best `last`); with
    `weights_prefix`, also the bare model state dict (the released format) as `{weights_prefix}-last/best.pth`."""

    def __init__(self, out_dir: Path, prefix: str, weights_prefix: Optional[str] = None):
        self.last = Path(out_dir) / f'{prefix}-ckpt-last.pth'
        self.best = Path(out_dir) / f'{prefix}-ckpt-best.pth'
        self.weights_last = self.weights_best = None
        if weights_prefix:
            self.weights_last = Path(out_dir) / f'{weights_prefix}-last.pth'
            self.weights_best = Path(out_dir) / f'{weights_prefix}-best.pth'

    def save(self, ckpt: Dict[str, Any], is_best: bool):
        save_atomic(ckpt, self.last)
        if self.weights_last is not None:
            save_atomic(dict(ckpt['model']), self.weights_last)
        if is_best:
            link_atomic(self.last, self.best)
            if self.weights_last is not None:
                link_atomic(self.weights_last, self.weights_best)

    def resume_path(self, resume: str) -> Optional[Path]:
        """The file `--resume` names: 'auto' = the last checkpoint if there is one, 'none' = start fresh."""
        if resume.lower() in RESUME_NONE:
            return None
        if resume == 'auto':
            return self.last if self.last.is_file() else None
        path = Path(resume)
        if not path.is_file():
            raise UserError(f'--resume {path}: file not found')
        return path


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the bytes of every parameter and buffer, in state-dict order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas(*models: torch.nn.Module) -> str:
    """The weights' digest, after checking that every rank holds bit-identical weights (raises if not)."""
    digest = hashlib.sha256(''.join(weights_digest(m) for m in models).encode()).hexdigest()
    if dist.is_initialized():
        digests: List[Any] = [None] * dist.get_world_size()
        tdist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f'ranks hold different weights: {[d[:12] for d in digests]}')
    return digest


# ---- the training loop ----------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one micro-batch reports to the loop."""
    loss: float                            # the training loss, averaged over ranks
    lr: float
    wd: float
    grad_norm: Optional[float] = None      # pre-clip norm; only on micro-batches that stepped
    scale_log2: Optional[float] = None     # fp16 loss scale
    metrics: Optional[Dict[str, float]] = None  # TensorBoard tag -> value, when asked for
    summary: str = ''                      # the model-specific part of the log line


class Trainer(Protocol):
    """What `TrainLoop` needs from a model-specific trainer (train.py's ARTrainer, train_tokenizer.py's)."""
    device: torch.device
    val_score: str                         # key of `evaluate`'s result that picks the best checkpoint (lower wins)
    tokens_per_image: Optional[int]
    rng_generators: Dict[str, random.Random]

    def step(self, it: int, batch, stepping: bool, want_metrics: bool) -> StepResult: ...

    def evaluate(self, loader) -> Dict[str, float]: ...

    def checkpoint(self) -> Dict[str, Any]: ...

    def load_checkpoint(self, ckpt: Dict[str, Any], path: Path): ...

    def replicated(self) -> Sequence[torch.nn.Module]: ...


def memory_gib(device: torch.device) -> float:
    """Peak memory since the last call: the CUDA allocator's peak, or the process's max RSS on the CPU."""
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) / GiB
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def resume_training(files: CheckpointFiles, resume: str, trainer: Trainer,
                    iters_per_epoch: int) -> Tuple[int, float, Optional[list]]:
    """(iteration, best score, per-rank RNG states) to continue from; (0, inf, None) for a fresh run."""
    path = files.resume_path(resume)
    if path is None:
        return 0, math.inf, None
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or 'it' not in ckpt:
        raise UserError(f'{path} is not a training checkpoint (no optimizer state or position); pass --resume none '
                        f'to start fresh')
    trainer.load_checkpoint(ckpt, path)
    if ckpt['iters_per_epoch'] != iters_per_epoch:
        log.warning('%s was written with %d it/epoch, now %d (the data or batch size changed): the data order differs',
                    path, ckpt['iters_per_epoch'], iters_per_epoch)
    log.info('resumed from %s at iteration %d (epoch %d, +%d it)', path, ckpt['it'], ckpt['epoch'], ckpt['epoch_it'])
    return ckpt['it'], ckpt['best'], ckpt['rng']


class TrainLoop:
    """Epochs of steps with logging, validation and checkpoints; stops at --max_steps or after --ep epochs."""

    def __init__(self, args, plan, trainer: Trainer, sampler, loader, val_loader, writer, files: CheckpointFiles,
                 is_main: bool, world: int, progress: bool):
        self.args, self.plan, self.trainer = args, plan, trainer
        self.sampler, self.loader, self.val_loader = sampler, loader, val_loader
        self.writer, self.files, self.is_main, self.world, self.progress = writer, files, is_main, world, progress
        self.best = math.inf

    def run(self, start_it: int, best: float):
        # With a progress bar, log lines are printed through tqdm so that they do not tear the bar.
        with logging_redirect_tqdm([logging.getLogger()]) if self.progress else contextlib.nullcontext():
            self._run(start_it, best)

    def _run(self, start_it: int, best: float):
        args, plan = self.args, self.plan
        it, self.best = start_it, best
        epoch, epoch_it = divmod(start_it, plan.iters_per_epoch)
        if args.max_steps and it >= args.max_steps:
            log.info('already at iteration %d >= --max_steps %d: nothing to do', it, args.max_steps)
            return
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
            bar.close()
            stop = bool(args.max_steps) and it >= args.max_steps
            if epoch_it < plan.iters_per_epoch:  # --max_steps inside an epoch
                self.save(it, epoch, epoch_it, is_best=False)
                log.info('stopped at --max_steps %d', args.max_steps)
                return
            epoch, epoch_it = epoch + 1, 0
            mean_loss = epoch_loss / max(epoch_steps, 1)
            log.info('epoch %d/%d done: mean loss %.4f over %d it', epoch, args.epochs, mean_loss, epoch_steps)
            self.writer.write(it, {'epoch/train_loss': mean_loss}, epoch=epoch)
            saved = False
            if epoch % args.save_freq == 0 or epoch == args.epochs:
                saved = self.end_of_epoch(it, epoch, mean_loss)
            if stop and epoch < args.epochs:
                if not saved:
                    self.save(it, epoch, 0, is_best=False)
                log.info('stopped at --max_steps %d', args.max_steps)
                return
        log.info('training done after %d iterations; best %s: %.4f', it,
                 f'val {self.trainer.val_score}' if self.val_loader is not None else 'epoch loss', self.best)

    def end_of_epoch(self, it: int, epoch: int, train_loss: float) -> bool:
        """Validate (when there is a val/ folder), then save; the best checkpoint by validation (else train) loss.
        Returns whether it saved."""
        score = train_loss
        if self.val_loader is not None:
            val = self.trainer.evaluate(self.val_loader)
            log.info('val after epoch %d: %s', epoch, ', '.join(f'{k} {v:.4f}' for k, v in val.items()))
            self.writer.write(it, {f'val/{k}': v for k, v in val.items()}, epoch=epoch)
            score = val[self.trainer.val_score]
        if it % self.args.accum:
            log.warning('epoch %d ended inside a gradient accumulation: not saving here', epoch)
            return False
        is_best = score < self.best
        self.best = min(self.best, score)
        self.save(it, epoch, 0, is_best)
        return True

    def save(self, it: int, epoch: int, epoch_it: int, is_best: bool):
        """On every rank: gather RNG states and check the replicas; rank 0 then writes the checkpoint atomically."""
        rng = gather_rng_states(self.trainer.rng_generators)
        digest = check_replicas(*self.trainer.replicated())
        if not self.is_main:
            return
        ckpt = self.trainer.checkpoint()
        ckpt.update(it=it, epoch=epoch, epoch_it=epoch_it, iters_per_epoch=self.plan.iters_per_epoch, best=self.best,
                    rng=rng, args=vars(self.args))
        self.files.save(ckpt, is_best)
        log.info('saved %s at iteration %d%s; weights sha256 %s identical on %d rank(s)', self.files.last, it,
                 ' (new best)' if is_best else '', digest[:16], self.world)

    def log_step(self, it: int, epoch: int, epoch_it: int, res: StepResult, elapsed: float, iters: int):
        images_per_s = iters * self.plan.micro_batch / max(elapsed, 1e-9)
        mem = memory_gib(self.trainer.device)
        scalars = dict(res.metrics or {})
        scalars.update({'opt/lr': res.lr, 'opt/wd': res.wd, 'opt/grad_norm': res.grad_norm,
                        'opt/scale_log2': res.scale_log2, 'speed/images_per_s': images_per_s,
                        'memory/peak_GiB': mem})
        speed = f'{images_per_s:.1f} img/s'
        if self.trainer.tokens_per_image:
            scalars['speed/tokens_per_s'] = images_per_s * self.trainer.tokens_per_image
            speed = f'{scalars["speed/tokens_per_s"]:.0f} tok/s'
        self.writer.write(it, scalars, epoch=epoch)
        scale = '' if res.scale_log2 is None else f' scale 2^{res.scale_log2:.0f}'
        grad = 'n/a' if res.grad_norm is None else f'{res.grad_norm:.3g}'
        log.info('ep %d/%d it %d/%d (%d) | %s | lr %.3g wd %.3g | gnorm %s%s | %s | mem %.2f GiB', epoch + 1,
                 self.args.epochs, epoch_it, self.plan.iters_per_epoch, it, res.summary, res.lr, res.wd, grad, scale,
                 speed, mem)
