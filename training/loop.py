"""Plumbing shared by the training CLIs: seeds and RNG states, the output folder, checkpoint files and resuming, a
check that every rank holds the same weights, and the epoch/step loop with logging, validation and saving."""
import contextlib
import hashlib
import logging
import math
import random
import re
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training import dist
from utils.checkpoint import CheckpointError, load_file, save_atomic
from utils.cli import UserError, signal_exit_code, writable_dir
from utils.fileio import link_atomic

log = logging.getLogger('viar')

RESUME_NONE = ('none', 'no', '')
RESUME_AUTO = 'auto'
GiB = 2 ** 30
ITER_DIGITS = 8              # {prefix}-ckpt-00001200.pth
DEFAULT_KEEP_LAST = 2        # checkpoints kept: the newest and one to fall back on
DEFAULT_MAX_NONFINITE = 5    # consecutive iterations with a NaN/Inf loss before the run stops
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
    return dist.all_gather_object(rng_state(generators))


def restore_rng_states(states: Optional[List[Dict[str, Any]]], generators: Dict[str, random.Random], seed: int,
                       rank: int, world: int, step: int):
    """Continue this rank's random streams from a checkpoint.

    If it was written by a different number of ranks, the per-rank streams are re-seeded from (seed, step, rank):
    the run goes on correctly, but not bit-identically. A generator that is one stream shared by every rank (e.g.
    --sjfb_shared_draws), before and after, continues that stream."""
    if states is not None and len(states) == world:
        set_rng_state(states[rank], generators)
        return
    log.warning('checkpoint holds RNG states of %s rank(s), this run has %d: re-seeding the per-rank random streams '
                '(the run continues, but not bit-identically)', 'no' if states is None else len(states), world)
    # Freshly seeded generators are equal on every rank exactly when they are meant to be shared.
    fresh = dist.all_gather_object({key: gen.getstate() for key, gen in generators.items()})
    seed_process(mix_seed(seed, step), rank)
    for i, (key, gen) in enumerate(generators.items()):
        shared_now = world > 1 and dist.all_equal(f[key] for f in fresh)
        saved = [_as_tuple(s[key]) for s in states or [] if key in s]
        shared_before = bool(saved) and dist.all_equal(saved)
        if shared_before and (shared_now or world == 1):
            gen.setstate(saved[0])
        else:
            gen.seed(mix_seed(seed, step, i) if shared_now else mix_seed(seed, step, rank, i))


# ---- output folder, checkpoint files, resume -----------------------------------------------------------------------
def prepare_out_dir(path, is_main: bool) -> Path:
    """Create the output folder (rank 0) and make sure it is writable."""
    if is_main:
        writable_dir(path, '--out_dir')
    return Path(path)


class CheckpointFiles:
    """The checkpoints of a run folder.

    Every save writes `{prefix}-ckpt-{iteration:08d}.pth` atomically, keeps the newest `keep_last` of them and points
    `{prefix}-ckpt-last.pth` at the newest (a hard link: no second copy); `{prefix}-ckpt-best.pth` links to the best.
    With `weights_prefix`, also the bare model state dict (the released format) as `{weights_prefix}-last/best.pth`.
    """

    def __init__(self, out_dir: Path, prefix: str, weights_prefix: Optional[str] = None,
                 keep_last: int = DEFAULT_KEEP_LAST):
        if keep_last < 1:
            raise UserError(f'--keep_last must be >= 1, got {keep_last}')
        self.out_dir, self.prefix, self.keep_last = Path(out_dir), prefix, keep_last
        self.last = self.out_dir / f'{prefix}-ckpt-last.pth'
        self.best = self.out_dir / f'{prefix}-ckpt-best.pth'
        self.weights_last = self.weights_best = None
        if weights_prefix:
            self.weights_last = self.out_dir / f'{weights_prefix}-last.pth'
            self.weights_best = self.out_dir / f'{weights_prefix}-best.pth'
        self._numbered_re = re.compile(rf'^{re.escape(prefix)}-ckpt-(\d+)\.pth$')
        self._swept = False

    def at(self, it: int) -> Path:
        return self.out_dir / f'{self.prefix}-ckpt-{it:0{ITER_DIGITS}d}.pth'

    def numbered(self) -> List[Tuple[int, Path]]:
        """(iteration, path) of every numbered checkpoint, oldest first."""
        found = []
        for path in self.out_dir.glob(f'{self.prefix}-ckpt-*.pth'):
            m = self._numbered_re.match(path.name)
            if m:
                found.append((int(m.group(1)), path))
        return sorted(found)

    def save(self, ckpt: Dict[str, Any], is_best: bool) -> Path:
        """Write the checkpoint of iteration `ckpt['it']`, repoint last/best, drop what is beyond --keep_last."""
        if not self._swept:  # temp files of a save that was killed
            for stale in self.out_dir.glob(f'.{self.prefix}-ckpt-*.tmp'):
                stale.unlink(missing_ok=True)
            self._swept = True
        path = self.at(ckpt['it'])
        try:
            save_atomic(ckpt, path)
            link_atomic(path, self.last)
            if self.weights_last is not None:
                save_atomic(dict(ckpt['model']), self.weights_last)
            if is_best:
                link_atomic(path, self.best)
                if self.weights_last is not None:
                    link_atomic(self.weights_last, self.weights_best)
        except OSError as e:
            raise UserError(f'could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint is '
                            f'intact: free disk space or fix the folder, then run the same command to resume') from None
        self._prune(ckpt['it'])
        return path

    def _prune(self, it: int):
        numbered = self.numbered()
        later = [p for i, p in numbered if i > it]
        if later:  # this run went back to an earlier checkpoint: the later ones belong to the abandoned attempt
            log.warning('removing %d checkpoint(s) after iteration %d from an abandoned attempt: %s', len(later), it,
                        ', '.join(p.name for p in later))
        kept = [p for i, p in numbered if i <= it]
        for path in later + kept[:-self.keep_last]:
            path.unlink(missing_ok=True)

    def resume_candidates(self, resume: str) -> List[Path]:
        """What `--resume` names, in the order to try: 'auto' = the numbered checkpoints newest first (then a `last`
        that is none of them, as older runs wrote it); 'none' = nothing; else that one file."""
        if resume.lower() in RESUME_NONE:
            return []
        if resume == RESUME_AUTO:
            candidates = [p for _, p in reversed(self.numbered())]
            if self.last.is_file() and not any(_same_file(self.last, p) for p in candidates):
                candidates.append(self.last)
            return candidates
        path = Path(resume)
        if not path.is_file():
            raise UserError(f'--resume {path}: file not found')
        return [path]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


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
    digests = dist.all_gather_object(digest)
    if not dist.all_equal(digests):
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
    skipped_steps: Optional[int] = None    # optimizer steps skipped so far for non-finite gradients (AmpOptimizer)
    metrics: Optional[Dict[str, float]] = None  # TensorBoard tag -> value, when asked for
    summary: str = ''                      # the model-specific part of the log line


class Trainer(Protocol):
    """What `TrainLoop` needs from a model-specific trainer (train.py's ARTrainer, train_tokenizer.py's)."""
    ckpt_kind: str                         # the 'kind' of its checkpoints: 'var' or 'vqvae'
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


def resume_training(files: CheckpointFiles, resume: str, trainer: Trainer, plan) -> Tuple[int, float, Optional[list]]:
    """(iteration, best score, per-rank RNG states) to continue from; (0, inf, None) for a fresh run.

    With --resume auto, the newest checkpoint that loads: a truncated or corrupt one is reported and skipped."""
    candidates = files.resume_candidates(resume)
    for path in candidates:
        try:
            ckpt = load_file(path)
        except CheckpointError as e:
            if resume != RESUME_AUTO:
                raise
            log.warning('%s; falling back to an older checkpoint', e)
            continue
        check_training_checkpoint(ckpt, path, trainer.ckpt_kind)
        check_resume_batch(ckpt, plan, path)
        trainer.load_checkpoint(ckpt, path)
        if ckpt['iters_per_epoch'] != plan.iters_per_epoch:
            log.warning('%s was written with %d it/epoch, now %d (the data changed): the data order differs', path,
                        ckpt['iters_per_epoch'], plan.iters_per_epoch)
        log.info('resumed from %s at iteration %d (epoch %d, +%d it)', path, ckpt['it'], ckpt['epoch'],
                 ckpt['epoch_it'])
        return ckpt['it'], ckpt['best'], ckpt['rng']
    if candidates:
        raise UserError(f'none of the {len(candidates)} checkpoint(s) in {files.out_dir} loads (see the warnings '
                        f'above); pass --resume PATH, or --resume none to start fresh')
    return 0, math.inf, None


# What every training checkpoint holds (TrainLoop.save), with the types a resume relies on.
TRAINING_KEYS = {'kind': str, 'config': dict, 'model': dict, 'amp': dict, 'it': int, 'epoch': int, 'epoch_it': int,
                 'iters_per_epoch': int, 'best': (int, float), 'rng': list}
BATCH_KEYS = {'micro_batch': int, 'accum': int, 'world': int}
RNG_KEYS = ('torch', 'python', 'numpy')
WRITERS = {'var': 'train.py', 'vqvae': 'train_tokenizer.py'}
KIND_NAMES = {'var': 'transformer (VAR/VIAR)', 'vqvae': 'tokenizer (VQVAE)'}


def check_training_checkpoint(ckpt: Any, path: Path, kind: str):
    """A one-line error unless `ckpt` is a complete training checkpoint of `kind` written by TrainLoop.save."""
    fresh = 'pass --resume none (or another --out_dir) to start fresh'
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a training checkpoint; {fresh}')
    other = ckpt.get('kind')
    if other in WRITERS and other != kind:
        hint = '--vae_ckpt' if kind == 'var' else '--init_from'
        raise UserError(f'{path} is a {KIND_NAMES[other]} checkpoint from {WRITERS[other]}, not a {WRITERS[kind]} '
                        f'checkpoint (to use it here, pass it as {hint}); {fresh}')
    if 'it' not in ckpt:
        raise UserError(f'{path} is not a training checkpoint (no optimizer state or position); {fresh}')
    keys = {**TRAINING_KEYS, **(BATCH_KEYS if 'micro_batch' in ckpt else {})}  # older checkpoints lack BATCH_KEYS
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise UserError(f'{path}: training checkpoint without {", ".join(missing)} (damaged or written by another '
                        f'tool); {fresh}')
    wrong = [f'{k} is a {type(ckpt[k]).__name__}' for k, t in keys.items()
             if not isinstance(ckpt[k], t) or isinstance(ckpt[k], bool)]
    if not wrong and not all(isinstance(s, dict) and all(k in s for k in RNG_KEYS) for s in ckpt['rng']):
        wrong.append(f'rng is not a list of RNG states ({", ".join(RNG_KEYS)})')
    if not wrong and not 0 <= ckpt['epoch_it'] <= ckpt['it']:
        wrong.append(f'it {ckpt["it"]} and epoch_it {ckpt["epoch_it"]} do not fit')
    if wrong:
        raise UserError(f'{path}: malformed training checkpoint ({"; ".join(wrong)}); {fresh}')


def check_resume_batch(ckpt: Dict[str, Any], plan, path: Path):
    """Iterations count micro-batches: resuming is only correct with the same images per micro-batch and the same
    accumulation. The number of ranks may change (the sampler deals each global batch out the same way)."""
    if 'micro_batch' not in ckpt:  # written before these fields existed
        return
    saved = (ckpt['micro_batch'], ckpt['accum'])
    if saved != (plan.micro_batch, plan.accum):
        raise UserError(
            f'{path} was trained with {ckpt["micro_batch"] * ckpt["accum"]} images per step ({ckpt["world"]} rank(s) x '
            f'{ckpt["micro_batch"] // ckpt["world"]} x {ckpt["accum"]} accumulation), this run would use '
            f'{plan.micro_batch * plan.accum} ({plan.world} x {plan.local_batch} x {plan.accum}): its iteration '
            f'{ckpt["it"]} would not continue the same data and lr schedule. Pick --bs/--ac and a number of ranks '
            f'that give {ckpt["micro_batch"]} images per micro-batch and --ac {ckpt["accum"]}, or start a new run '
            f'(--resume none or another --out_dir)')
    if ckpt['world'] != plan.world:
        log.warning('%s was written by %d rank(s), this run has %d: same global batch and data order, so the run '
                    'continues correctly', path, ckpt['world'], plan.world)


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
        from training.data import stop_workers  # here: training.data imports this module
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
