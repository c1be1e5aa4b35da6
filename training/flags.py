"""Flags shared by the training CLIs (data, optimisation, run) and the values derived from them (`Plan`)."""
import argparse
import logging
import math
import os
from dataclasses import dataclass

import torch

from training.amp import PRECISIONS, effective_precision, official_precision
from training.checkpoints import DEFAULT_KEEP_LAST
from training.dist import DEFAULT_TIMEOUT_MIN
from training.optim import SCHEDULES
from training.stopping import DEFAULT_MAX_NONFINITE
from utils.cli import NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, SEED, UserError, finite_float, int_range

log = logging.getLogger('viar')

IMAGES_PER_BASE_LR = 256     # peak lr = ac * tblr * global batch / 256 (official)
WARMUP_EPOCH_DIVISOR = 50    # --wp 0 means ep / 50 warmup epochs (official)
AUTO_WORKERS_MAX = 8
MAX_WORKERS = 256
MAX_MID_RESO = 4.0          # --mid_reso: the resize before the crop, at most 4x the image size
MAX_PATCH_SIDE = 256        # --pn: token-map sides


def add_data_flags(p: argparse.ArgumentParser):
    d = p.add_argument_group('data')
    d.add_argument('--data_path', required=True, help='ImageFolder root: train/<class>/<image>, optional val/<class>/')
    d.add_argument('--mid_reso', type=finite_float(1, MAX_MID_RESO), default=1.125,
                   help='resize the shorter side to mid_reso x image size, then crop')
    d.add_argument('--hflip', action=argparse.BooleanOptionalAction, default=False, help='random horizontal flips')
    d.add_argument('--workers', type=int_range(-1, MAX_WORKERS), default=-1,
                   help=f'data workers per rank (0: main process; -1: min({AUTO_WORKERS_MAX}, CPUs per rank))')
    d.add_argument('--skip_bad_images', action=argparse.BooleanOptionalAction, default=False,
                   help='log and skip unreadable images instead of stopping with an error')
    return d


RELEASED_PATCH_NUMS = '1_2_3_4_5_6_8_10_13_16'


def patch_nums_arg(value: str) -> tuple:
    """argparse type for the official --pn spelling: '1_2_3_4_6_8' (or '256' for the released scales)."""
    value = RELEASED_PATCH_NUMS if value == '256' else value
    try:
        sides = tuple(int(v) for v in value.replace(',', '_').split('_'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected scale sides like 1_2_3_4_6_8, got {value!r}') from None
    if not all(1 <= s <= MAX_PATCH_SIDE for s in sides):
        raise argparse.ArgumentTypeError(f'scale sides must lie in [1, {MAX_PATCH_SIDE}], got {value!r}')
    return sides


def add_optim_flags(p: argparse.ArgumentParser, batch_size: int, epochs: int, base_lr: float, weight_decay: float,
                    betas, schedule: str, lr_end: float, grad_clip: float):
    """Optimisation flags; the defaults differ between the AR and the tokenizer recipes."""
    o = p.add_argument_group('optimisation')
    o.add_argument('--batch_size', '--bs', type=POSITIVE, default=batch_size,
                   help='global batch: all ranks and accumulation steps together')
    o.add_argument('--accum', '--ac', type=POSITIVE, default=1, help='gradient accumulation steps')
    o.add_argument('--epochs', '--ep', type=POSITIVE, default=epochs)
    o.add_argument('--base_lr', '--tblr', type=NON_NEGATIVE_FLOAT, default=base_lr,
                   help=f'lr per {IMAGES_PER_BASE_LR} images: peak lr = ac x tblr x global batch / '
                        f'{IMAGES_PER_BASE_LR}')
    o.add_argument('--lr', '--tlr', type=NON_NEGATIVE_FLOAT,
                   help='the peak lr itself, instead of scaling --tblr by the batch (official --tlr)')
    o.add_argument('--weight_decay', '--twd', type=NON_NEGATIVE_FLOAT, default=weight_decay)
    o.add_argument('--weight_decay_end', '--twde', type=NON_NEGATIVE_FLOAT,
                   help='weight decay at the end of its cosine ramp (default, or 0 as in the official: --twd)')
    o.add_argument('--grad_clip', '--tclip', type=NON_NEGATIVE_FLOAT, default=grad_clip,
                   help='max gradient norm (0: no clipping)')
    o.add_argument('--warmup_epochs', '--wp', type=NON_NEGATIVE_FLOAT, default=0.0,
                   help=f"0: epochs / {WARMUP_EPOCH_DIVISOR} (none for --sche const)")
    o.add_argument('--warmup_start', '--wp0', type=NON_NEGATIVE_FLOAT, default=0.005,
                   help='lr factor when warmup starts')
    o.add_argument('--lr_end', '--wpe', type=NON_NEGATIVE_FLOAT, default=lr_end, help='lr factor at the last iteration')
    o.add_argument('--schedule', '--sche', choices=SCHEDULES, default=schedule,
                   help="lr schedule after warmup ('const': the peak lr throughout, e.g. for fine-tuning)")
    o.add_argument('--betas', type=finite_float(0, 1, hi_open=True), nargs=2, default=tuple(betas), help='AdamW betas')
    o.add_argument('--precision', choices=PRECISIONS, default='fp32',
                   help='autocast precision: bf16 on CUDA or the CPU, fp16 (with GradScaler) on CUDA only '
                        '(fp16 on the CPU trains in fp32); saved in every checkpoint')
    o.add_argument('--fp16', dest='precision', type=official_precision, default=argparse.SUPPRESS,
                   help='official spelling of --precision: 0 fp32, 1 fp16, 2 bf16')
    o.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=True,
                   help='TF32 matmuls/convs on CUDA (official default)')
    return o


def add_run_flags(p: argparse.ArgumentParser, ckpt_prefix: str):
    r = p.add_argument_group('run')
    r.add_argument('--out_dir', '--local_out_dir_path', default='local_output', help='checkpoints, logs, TensorBoard')
    r.add_argument('--resume', default='auto', help=f"'auto': continue from OUT_DIR/{ckpt_prefix}-ckpt-last.pth if "
                                                    f"present; 'none'; or a checkpoint path")
    r.add_argument('--seed', type=SEED, default=0, help='seeds initialisation, data order and augmentation, dropout '
                                                       'and every other random draw')
    r.add_argument('--save_freq', type=POSITIVE, default=5, help='validate and save every N epochs (and at the end)')
    r.add_argument('--save_steps', type=NON_NEGATIVE, default=0, help='also save every N iterations (0: off)')
    r.add_argument('--keep_last', type=POSITIVE, default=DEFAULT_KEEP_LAST,
                   help=f'keep the newest K checkpoints ({ckpt_prefix}-ckpt-<iteration>.pth): --resume auto falls back '
                        f'to an older one when the newest does not load')
    r.add_argument('--max_nonfinite', type=POSITIVE, default=DEFAULT_MAX_NONFINITE,
                   help='stop after N consecutive iterations with a NaN/Inf loss (their optimizer steps are skipped)')
    r.add_argument('--max_steps', type=NON_NEGATIVE, default=0,
                   help='stop (and save) after N iterations; the lr schedule still spans --ep epochs (0: off)')
    r.add_argument('--log_freq', type=POSITIVE, default=100, help='log every N iterations')
    r.add_argument('--progress', action=argparse.BooleanOptionalAction,
                   help='tqdm bar on rank 0 (default: when stderr is a terminal)')
    r.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto')
    r.add_argument('--dist_timeout', type=finite_float(0, lo_open=True), default=DEFAULT_TIMEOUT_MIN,
                   help='minutes a rank waits in a collective for the others before failing (a dead or hung rank '
                        'then ends the run instead of hanging it)')
    return r


def check_flags(args):
    """What the argparse types cannot see: flags that must agree with each other."""
    for name in ('save_steps', 'max_steps'):
        value = getattr(args, name)
        if value < 0 or value % args.accum:
            raise UserError(f'--{name} ({value}) must be >= 0 and a multiple of --ac ({args.accum})')


def configure_backends(tf32: bool, device: torch.device):
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision('high' if tf32 else 'highest')


@dataclass(frozen=True)
class Plan:
    """Values derived from the flags, the world size and the data: computed once, logged once."""
    world: int
    accum: int
    local_batch: int        # images per rank per micro-batch
    micro_batch: int        # images per micro-batch over all ranks (the official glb_batch_size)
    peak_lr: float
    iters_per_epoch: int    # micro-batches per epoch
    max_iters: int
    warmup_iters: int
    wd_end: float
    precision: str
    workers: int

    def describe(self, args) -> str:
        lr_from = '(--tlr)' if args.lr is not None else \
            f'= {self.accum} x {args.base_lr:g} x {self.micro_batch} / {IMAGES_PER_BASE_LR}'
        return (f'global batch {self.micro_batch * self.accum} = {self.world} rank(s) x {self.local_batch} x '
                f'{self.accum} accumulation | peak lr {self.peak_lr:.4g} {lr_from}, {args.schedule} | '
                f'{self.iters_per_epoch} it/epoch, {self.max_iters} it in {args.epochs} epochs, warmup '
                f'{self.warmup_iters} it | wd {args.weight_decay:g} -> {self.wd_end:g} | {self.precision} | '
                f'{self.workers} data worker(s) per rank')


def derive_plan(args, world: int, num_images: int, device_type: str) -> Plan:
    """Per-rank batch, scaled lr and iteration counts (official arg_util rules)."""
    local = round(args.batch_size / args.accum / world)
    if local < 1:
        raise UserError(f'--bs {args.batch_size} is too small for {world} rank(s) x --ac {args.accum}: every rank '
                        f'needs at least one image per micro-batch')
    micro = local * world
    if micro * args.accum != args.batch_size:
        log.warning('--bs %d is not divisible by %d rank(s) x --ac %d: training with %d images per step',
                    args.batch_size, world, args.accum, micro * args.accum)
    iters = math.ceil(num_images / micro)
    default_warmup = 0.0 if args.schedule == 'const' else args.epochs / WARMUP_EPOCH_DIVISOR
    warmup_epochs = args.warmup_epochs or default_warmup
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    workers = args.workers if args.workers >= 0 else min(AUTO_WORKERS_MAX, (os.cpu_count() or 1) // local_world)
    precision = effective_precision(args.precision, device_type)
    if precision != args.precision:
        log.info('--precision %s needs CUDA (on the CPU use bf16): training in %s', args.precision, precision)
    return Plan(world=world, accum=args.accum, local_batch=local, micro_batch=micro,
                peak_lr=args.lr if args.lr is not None else args.accum * args.base_lr * micro / IMAGES_PER_BASE_LR,
                iters_per_epoch=iters, max_iters=args.epochs * iters, warmup_iters=round(warmup_epochs * iters),
                wd_end=args.weight_decay_end or args.weight_decay,  # official: twde = twde or twd
                precision=precision, workers=min(workers, local))
