"""Generate N images per class (default 50 x 1000 classes) as PNGs plus an ADM-format .npz, for FID evaluation.

    torchrun --nproc_per_node=8 sampling.py --ckpt ckpts/viar.pth --vae_ckpt ckpts/vae_ch160v4096z32.pth --cfg 1.5

Sharded over torchrun processes and resumable: re-running the same command skips finished images. Image i (class
classes[i // N]) is drawn with its own seed derived from --seed and i, in fixed batches of --batch_size, so the
result does not depend on the number of processes or on interruptions. Beside the PNG folder it writes
`<run>.npz` (`arr_0`, uint8 NHWC) and `<run>.json` (every knob). The official command line works as it is
(`--ckpt_path ... --depth 30 --use_implicit True --iter_left 10 --iter_right 10`) and writes the official
`samples/implicit-viar.pth-cfg-1.5-seed-1{/,.npz}`; utils/official.py has the naming rule.

The command is sampling.py (a thin entry point); the shared flags are generation/model_flags.py and
generation/sampling_flags.py; the sampler is models/sampler.py.
"""
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from generation.model_flags import add_model_args, autocast_dtype, load_from_args, sampling_mode
from generation.sampling_flags import (add_sampling_args, describe_schedule, parse_classes, schedule_from_args,
                                       subnet_from_args, trunk_step_from_args)
from models import VARConfig
from models.fixed_point import make_solver
from models.sampler import autoregressive_infer_cfg, image_seed
from training import dist
from utils import official
from utils.cli import POSITIVE, SEED, ArgumentParser, UserError, int_range, writable_dir
from utils.fileio import read_json_object, write_json_atomic
from utils.hub import is_hub_reference
from utils.images import load_png_rgb, save_png_atomic, to_uint8_hwc, write_npz_stream
from utils.log import setup_logging

log = logging.getLogger('viar')
MAX_PER_CLASS = 100_000  # images per class (ADM's FID protocol uses 50)


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    add_model_args(p)
    add_sampling_args(p)
    g = p.add_argument_group('output')
    g.add_argument('--per_class', type=int_range(1, MAX_PER_CLASS), default=50, help='images per class')
    g.add_argument('--classes', default='all', help="'all', a range '0-99' or a list '1,5,9'")
    g.add_argument('--batch_size', type=POSITIVE, default=25, help='images per forward pass (per process)')
    g.add_argument('--seed', type=SEED, default=1, help='global seed; image i uses a seed derived from it and i')
    g.add_argument('--sample_dir', default='samples', help='parent folder of the run folder, .npz and .json')
    g.add_argument('--name', default=None, help='run name (default: the official name, e.g. '
                   'implicit-viar.pth-cfg-1.5-seed-1, plus the knobs it cannot express; see utils/official.py)')
    g.add_argument('--no_npz', action='store_true', help='only write PNGs')
    g.add_argument('--dry_run', action='store_true', help='print the .npz path this command writes, then exit')
    return p


def run_name(args, var, schedule, subnet) -> str:
    """The official run name, plus the knobs it cannot express (utils/official.py)."""
    extras = official.non_official_knobs(args, var.use_implicit, schedule, subnet)
    return official.sample_run_name(args.ckpt, var.use_implicit, var.depth, args.cfg, args.seed, extras)


def checkpoint_name(ref: str) -> str:
    """How a run records a checkpoint: a Hub reference as given, a file by its absolute path."""
    return ref if is_hub_reference(ref) else os.path.abspath(ref)


def knobs_of(args, var, schedule, subnet, classes, amp_dtype: torch.dtype) -> dict:
    """Everything that determines the images (compared on resume, saved beside the .npz)."""
    return {
        'ckpt': checkpoint_name(args.ckpt), 'vae_ckpt': checkpoint_name(args.vae_ckpt),
        'model': var.config.to_dict(), 'cfg': args.cfg, 'top_k': args.top_k, 'top_p': args.top_p,
        'more_smooth': args.more_smooth, 'schedule': describe_schedule(args, schedule),
        'iters_per_scale': schedule.caps(len(var.patch_nums)) if var.use_implicit else None,
        'kv_policy': args.kv_policy, 'solver': args.solver, 'seed': args.seed, 'per_class': args.per_class,
        'subnet': None if subnet is None else {'depth': subnet.depth, 'bridge': subnet.bridge,
                                               'selection': subnet.selection,
                                               'layers': list(subnet.layers(var.depth))},
        'classes': classes, 'batch_size': args.batch_size, 'dtype': str(amp_dtype).replace('torch.', ''),
        'image_size': var.vae.config.image_size,
        'compile': args.compile_mode if args.compile else None,   # compiled kernels may round differently
    }


def claim_run_dir(out_dir: Path, meta_path: Path, knobs: dict):
    """Create the run folder, or check that an existing one was made with the same knobs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        old = read_json_object(meta_path).get('knobs')
        if not isinstance(old, dict):
            raise UserError(f'{meta_path}: holds no knobs object (not written by sampling.py?); pass another --name '
                            f'or remove it')
        if isinstance(old.get('model'), dict):  # runs from before a config field was renamed still resume
            old = dict(old, model=VARConfig.current_names(old['model']))
        diff = sorted(k for k in knobs if old.get(k) != knobs[k])
        if diff:
            raise UserError(f'{out_dir} holds samples made with other settings ({", ".join(diff)}); '
                            f'pass another --name or remove the folder')
    else:
        write_json_atomic(meta_path, {'knobs': knobs})


def main(args):
    info = dist.init_distributed(device=args.device)
    if not args.dry_run:  # a dry run's stdout is the path alone
        setup_logging(info.rank)
    if info.is_main and not args.dry_run:
        writable_dir(args.sample_dir, '--sample_dir')
    torch.backends.cuda.matmul.allow_tf32 = True  # as the official sampler
    torch.backends.cudnn.allow_tf32 = True
    device = info.device
    amp_dtype = autocast_dtype(args.precision, device)
    vae, var = load_from_args(args, device)
    classes = parse_classes(args.classes, var.num_classes)
    schedule = schedule_from_args(args, var, calibration_seed=args.seed)
    solver = make_solver(args.solver)
    subnet = subnet_from_args(args, var)
    trunk_step = trunk_step_from_args(args)

    name = args.name or run_name(args, var, schedule, subnet)
    root = Path(args.sample_dir)
    out_dir, meta_path, npz_path = root / name, root / f'{name}.json', root / f'{name}.npz'
    knobs = knobs_of(args, var, schedule, subnet, classes, amp_dtype)
    if args.dry_run:
        if info.is_main:
            print(npz_path)
        dist.destroy()
        return
    if info.is_main:
        claim_run_dir(out_dir, meta_path, knobs)
        for stale in out_dir.glob('.*.tmp'):  # half-written PNGs of a killed run
            stale.unlink()
    dist.barrier()

    total = args.per_class * len(classes)
    num_batches = math.ceil(total / args.batch_size)
    # Fixed batches over the global index space: batch b is [b*bs, (b+1)*bs), done by rank b % world. A batch is
    # skipped only when all its images exist, so a resumed run computes exactly the same batches.
    mine = [b for b in range(info.rank, num_batches, info.world_size)
            if not all((out_dir / f'{i:06d}.png').exists()
                       for i in range(b * args.batch_size, min(total, (b + 1) * args.batch_size)))]
    log.info(f'{name}: {total} images ({args.per_class} x {len(classes)} classes), {num_batches} batches, '
             f'{len(mine)} to do on rank {info.rank}/{info.world_size}; schedule {knobs["schedule"]}, precision '
             f'{knobs["dtype"]}')
    t0 = time.time()
    done = 0
    for b in tqdm(mine, disable=None if info.is_main else True, desc='sampling', unit='batch'):  # None: a TTY only
        idx = list(range(b * args.batch_size, min(total, (b + 1) * args.batch_size)))
        labels = torch.tensor([classes[i // args.per_class] for i in idx], device=device)
        with sampling_mode(device, amp_dtype):
            img = autoregressive_infer_cfg(var, len(idx), labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                           more_smooth=args.more_smooth, schedule=schedule,
                                           image_seeds=[image_seed(args.seed, i) for i in idx],
                                           kv_policy=args.kv_policy, solver=solver, subnet=subnet,
                                           trunk_step=trunk_step)
        for i, arr in zip(idx, to_uint8_hwc(img)):
            save_png_atomic(arr, out_dir / f'{i:06d}.png')
        done += len(idx)
    elapsed = time.time() - t0
    if done:
        log.info(f'rank {info.rank}: {done} images in {elapsed:.1f}s ({done / elapsed:.2f} images/s)')
    dist.barrier()
    if info.is_main and not args.no_npz:
        if packed_npz_is_current(out_dir, npz_path, meta_path, total):
            log.info(f'{npz_path} is newer than every image: kept as it is (its activation caches stay valid)')
        else:
            pack_npz(out_dir, npz_path, total, var.vae.config.image_size)
            write_json_atomic(meta_path, {'knobs': knobs, 'npz': str(npz_path), 'num_images': total})
            log.info(f'wrote {npz_path} ({total} images) and {meta_path}')
    dist.destroy()


def packed_npz_is_current(out_dir: Path, npz_path: Path, meta_path: Path, total: int) -> bool:
    """True when a finished earlier run packed these `total` images and none has changed since.

    The .json records the image count once the .npz is complete (claim_run_dir has checked its knobs), and the .npz
    must be newer than every PNG: an image written or replaced after the packing makes it stale. Rewriting an
    unchanged .npz would make it newer than the evaluator's activation cache beside it, which then recomputes.
    """
    if not npz_path.is_file() or read_json_object(meta_path).get('num_images') != total:
        return False
    packed = npz_path.stat().st_mtime_ns
    for i in range(total):
        png = out_dir / f'{i:06d}.png'
        if not png.is_file() or png.stat().st_mtime_ns > packed:
            return False
    return True


def pack_npz(out_dir: Path, npz_path: Path, total: int, image_size: int):
    """Read 000000.png ... in order into `arr_0` (uint8, NHWC), streaming, atomically."""
    missing = [i for i in range(total) if not (out_dir / f'{i:06d}.png').exists()]
    if missing:
        raise UserError(f'{len(missing)} images missing in {out_dir} (first: {missing[0]:06d}.png); re-run to finish')
    rows = (load_png_rgb(out_dir / f'{i:06d}.png') for i in tqdm(range(total), desc='packing npz', unit='img',
                                                                           disable=None))
    write_npz_stream(npz_path, rows, total, (image_size, image_size, 3))
