"""A run's output folder and checkpoint files: numbered atomic saves with last/best links, pruning, the checks a
training checkpoint must pass, and resuming from the newest checkpoint that loads."""
import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from training.trainer import Trainer
from utils.checkpoint import CheckpointError, load_file, save_atomic
from utils.cli import UserError, writable_dir
from utils.fileio import link_atomic

log = logging.getLogger('viar')

RESUME_NONE = ('none', 'no', '')
RESUME_AUTO = 'auto'
ITER_DIGITS = 8              # {prefix}-ckpt-00001200.pth
DEFAULT_KEEP_LAST = 2        # checkpoints kept: the newest and one to fall back on


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


def resume_training(files: CheckpointFiles, args, trainer: Trainer, plan) -> Tuple[int, float, Optional[list]]:
    """(iteration, best score, per-rank RNG states) to continue from; (0, inf, None) for a fresh run.

    With --resume auto, the newest checkpoint that loads: a truncated or corrupt one is reported and skipped. The run's
    flags (`args`) must match the ones the checkpoint was trained with (`check_resume_recipe`)."""
    resume = args.resume
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
        trainer.load_checkpoint(ckpt, path)  # first: it names a changed architecture in the model's terms
        check_resume_recipe(ckpt, vars(args), path, explicit=resume != RESUME_AUTO)
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


# Flags that may change when a run resumes: where files live, how long the run goes on, how it logs, saves and
# runs. Every other flag shapes what is trained (recipe, data transform, seed, precision, S-JFB ranges, ...).
RESUMABLE_FLAGS = frozenset({
    'out_dir', 'resume', 'epochs', 'max_steps', 'save_freq', 'save_steps', 'keep_last', 'log_freq', 'progress',
    'max_nonfinite', 'workers', 'device', 'dist_timeout', 'debug', 'exp_name', 'skip_bad_images', 'tf32', 'compile',
    'tfast', 'vfast', 'afuse', 'fuse', 'data_path', 'vae_ckpt', 'token_cache', 'init_from', 'lpips_weights',
    'lpips_heads', 'preset', 'batch_size', 'accum'})  # the preset's values and the batch are checked one by one


def recipe_changes(saved: Dict[str, Any], args: Dict[str, Any]) -> List[str]:
    """'--flag OLD (now NEW)' for every flag outside RESUMABLE_FLAGS whose value differs from the saved run's.
    Flags the saved run did not know (added since) are not compared."""
    def as_typed(value):  # a flag's value as the command line spells it: nargs flags space-separated
        return ' '.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    def comparable(value):  # nargs flags are tuples as defaults, lists when given (and after a checkpoint round trip)
        return list(value) if isinstance(value, tuple) else value
    return [f'--{k} {as_typed(saved[k])} (now {as_typed(v)})' for k, v in sorted(args.items())
            if k not in RESUMABLE_FLAGS and k in saved and comparable(saved[k]) != comparable(v)]


def check_resume_recipe(ckpt: Dict[str, Any], args: Dict[str, Any], path: Path, explicit: bool):
    """A run that continues must be the run that was started: with --resume auto, a checkpoint trained with other
    recipe flags (say a plan that changed --tblr while its output folder was reused) stops the run instead of being
    silently continued or, when it had finished, returned as if trained with the new flags. Naming the checkpoint
    with --resume PATH continues it on purpose, with a warning."""
    changes = recipe_changes(ckpt.get('args') or {}, args)
    if not changes:
        return
    listed = ', '.join(changes)
    if explicit:
        log.warning('%s was trained with %s: continuing it with the new values, as --resume names it', path, listed)
        return
    raise UserError(f'{path} was trained with {listed}; pass the same flags, --resume {path} to continue it with the '
                    f'new ones, or another --out_dir (or --resume none) to start fresh')


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
