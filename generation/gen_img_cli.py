"""Class-conditional images and grids, zero-shot in-/out-painting and box editing, and convergence traces.

    python gen_img.py --use_implicit --save_grid                                    # the official README command
    python gen_img.py --classes 970 --seeds 10-19 --save_grid --out_dir grids       # our spellings, flat folder
    python gen_img.py --edit_image photo.jpg --box 0.25,0.25,0.75,0.75 --edit_mode inpaint
    python gen_img.py --edit_image photo.jpg --box 0.2,0.3,0.6,0.9 --edit_mode inpaint --edit_class 207
    python gen_img.py --classes 1,2 --seeds 0-3 --trace                             # residual/cosine per scale

One image per (class, seed); an image's randomness depends only on its seed (for one image this reproduces the
official gen_img.py with the same seed). Outputs go to gen_images/<checkpoint stem>/ with the official file names
(--output_dir sets the parent), or straight into --out_dir with grid.png.

The command is gen_img.py (a thin entry point); the shared flags are generation/model_flags.py and
generation/sampling_flags.py; the sampler is models/sampler.py.
"""
import logging
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from generation.model_flags import add_model_args, autocast_dtype, load_from_args, resolve_device, sampling_mode
from generation.sampling_flags import (MAX_IDS, add_sampling_args, describe_schedule, parse_classes, parse_ids,
                                       schedule_from_args, subnet_from_args, trunk_step_from_args)
from models.fixed_point import make_solver
from models.sampler import autoregressive_infer_cfg, make_edit_spec
from utils import official
from utils.cli import (MAX_SEED, NON_NEGATIVE, POSITIVE, ArgumentParser, UserError, int_range,
                       refuse_overwriting_inputs, writable_dir)
from utils.images import save_png_atomic, to_rgb, to_uint8_hwc
from utils.log import setup_logging
from utils.plots import write_trace

log = logging.getLogger('viar')
GRID_PAD, GRID_PAD_VALUE = 2, 1.0  # white 2px borders, as the official grid
EDIT_MODES = ('inpaint', 'outpaint')


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    add_model_args(p)
    p.add_argument('--var_ckpt', dest='ckpt', help='official spelling of --ckpt (default: ckpts/viar.pth, or '
                   'ckpts/var_d<depth>.pth given --no-use_implicit or --depth without --use_implicit)')
    p.set_defaults(ckpt=None)
    add_sampling_args(p)
    g = p.add_argument_group('what to generate')
    g.add_argument('--classes', '--class_label', default='970', help="class ids, e.g. '970' or '1,207,360'")
    g.add_argument('--seeds', nargs='+', default=['10-19'], help="seeds per class: '10 11 12', '10-19' or '0,5'")
    g.add_argument('--batch_size', type=POSITIVE, default=16, help='images per forward pass')
    g.add_argument('--output_dir', default=None, help='official layout: write into OUTPUT_DIR/<checkpoint file name '
                   f'without .pth>/ (default {official.OFFICIAL_GEN_DIR})')
    g.add_argument('--out_dir', default=None, help='write straight into OUT_DIR, the grid as grid.png')
    g.add_argument('--save_grid', action='store_true',
                   help='also write a grid (official name, e.g. class970_seeds10_11_12_grid.png; with --out_dir '
                        'grid.png)')
    g.add_argument('--nrow', type=NON_NEGATIVE, default=0,
                   help=f'grid columns (0: one row per class; {official.OFFICIAL_NROW}, as the official, for one '
                        f'class)')
    g.add_argument('--trace', action='store_true',
                   help='write trace.json and trace.png: fixed-point residual and cosine per scale and iteration')
    e = p.add_argument_group('zero-shot editing')
    e.add_argument('--edit_image', default=None, help='source image: switches to editing')
    e.add_argument('--box', default=None, help='edit box x0,y0,x1,y1 as fractions of width/height')
    e.add_argument('--mask', default=None, help='mask image instead of --box: white = region to regenerate')
    e.add_argument('--edit_mode', default='inpaint', choices=EDIT_MODES,
                   help='inpaint: regenerate the region; outpaint: keep the region, regenerate the rest')
    e.add_argument('--edit_class', type=int_range(-1), default=-1,
                   help='class for the generated part (-1: unconditional in-painting; CFG is then inert)')
    return p


def load_source_image(path: str, size: int) -> torch.Tensor:
    """Image file -> (1, 3, size, size) in [-1, 1]: shorter side resized (Lanczos), centre crop."""
    if not Path(path).is_file():
        raise UserError(f'edit image not found: {path}')
    try:
        with Image.open(path) as im:
            im.load()
            im = to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f'cannot read edit image {path}: {e}') from None
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) * 2 - 1


def region_mask(args, grid: int) -> torch.Tensor:
    """(grid, grid) float mask on the finest token grid: 1 inside the region named by --box or --mask."""
    if (args.box is None) == (args.mask is None):
        raise UserError('editing needs exactly one of --box and --mask')
    if args.box is not None:
        try:
            x0, y0, x1, y1 = (float(v) for v in args.box.split(','))
        except ValueError:
            raise UserError(f'--box must be x0,y0,x1,y1 fractions, got {args.box!r}') from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise UserError(f'--box {args.box} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1')
        m = torch.zeros(grid, grid)
        m[round(y0 * grid):round(y1 * grid), round(x0 * grid):round(x1 * grid)] = 1
        return m
    if not Path(args.mask).is_file():
        raise UserError(f'mask image not found: {args.mask}')
    try:
        with Image.open(args.mask) as im:
            im.load()
            arr = np.asarray(to_rgb(im).convert('L'), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f'cannot read mask image {args.mask}: {e}') from None
    return F.interpolate(torch.from_numpy(arr)[None, None], size=(grid, grid), mode='area')[0, 0].gt(0.5).float()


def generate(args, var, schedule, solver, subnet, amp_dtype, device, labels: List[int], seeds: List[int],
             edit=None, trace: Optional[dict] = None) -> torch.Tensor:
    """All requested images, in batches; returns (N, 3, H, W) in [0, 1] on the CPU."""
    out = []
    for start in range(0, len(labels), args.batch_size):
        lab = torch.tensor(labels[start:start + args.batch_size], device=device)
        with sampling_mode(device, amp_dtype):
            img = autoregressive_infer_cfg(var, len(lab), lab, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                           more_smooth=args.more_smooth, schedule=schedule,
                                           image_seeds=seeds[start:start + args.batch_size],
                                           kv_policy=args.kv_policy, solver=solver, edit=edit, subnet=subnet,
                                           trace=trace if start == 0 else None, trunk_step=trunk_step_from_args(args))
        out.append(img.float().cpu())
    return torch.cat(out)


def main(args):
    setup_logging(0)
    if args.out_dir is not None and args.output_dir is not None:
        raise UserError('give --out_dir (files straight in it) or --output_dir (a subfolder per checkpoint), not both')
    if args.ckpt is None:
        args.ckpt = str(official.default_gen_ckpt(args.use_implicit, args.depth))
    out_dir = writable_dir(official.gen_output_dir(args.out_dir, args.output_dir, args.ckpt),
                           '--out_dir' if args.out_dir is not None else '--output_dir')
    device = resolve_device(args.device)
    amp_dtype = autocast_dtype(args.precision, device)
    vae, var = load_from_args(args, device)
    schedule = schedule_from_args(args, var)
    solver = make_solver(args.solver)
    subnet = subnet_from_args(args, var)
    seeds = [s for spec in args.seeds for s in parse_ids(spec, 'seeds', 0, MAX_SEED)]
    if len(seeds) > MAX_IDS:
        raise UserError(f'--seeds selects {len(seeds)} seeds, more than the limit of {MAX_IDS} per run')
    trace = {} if args.trace else None
    if args.edit_image is not None:
        if not 0 <= args.edit_class < var.num_classes and args.edit_class != -1:
            raise UserError(f'--edit_class must be -1 or in 0..{var.num_classes - 1}, got {args.edit_class}')
        classes, prefix = [args.edit_class if args.edit_class >= 0 else var.num_classes], 'edit'
    else:
        classes, prefix = parse_classes(args.classes, var.num_classes), 'class'
    grid_name = 'grid.png' if args.out_dir is not None else official.grid_name(prefix, classes, seeds)
    outputs = [out_dir / f'{prefix}{c}_seed{s}.png' for c in classes for s in seeds]
    outputs += [out_dir / name for name in ('source.png', 'source_kept.png', grid_name, 'trace.json', 'trace.png')]
    refuse_overwriting_inputs({'--edit_image': args.edit_image, '--mask': args.mask, '--ckpt': args.ckpt,
                               '--vae_ckpt': args.vae_ckpt}, outputs,
                              '--out_dir' if args.out_dir is not None else '--output_dir')

    edit = None
    if args.edit_image is not None:
        size = vae.config.image_size
        src = load_source_image(args.edit_image, size).to(device)
        region = region_mask(args, var.patch_nums[-1])
        keep = 1 - region if args.edit_mode == 'inpaint' else region
        with torch.inference_mode():
            gt = vae.img_to_idxBl(src)
        edit = make_edit_spec(gt, keep.unsqueeze(0).to(device), var.patch_nums)
        save_png_atomic(to_uint8_hwc(src.add(1).mul(0.5))[0], out_dir / 'source.png')
        shown = src.add(1).mul(0.5) * F.interpolate(keep[None, None].to(device), size=(size, size), mode='nearest')
        save_png_atomic(to_uint8_hwc(shown)[0], out_dir / 'source_kept.png')

    labels = [c for c in classes for _ in seeds]
    all_seeds = [s for _ in classes for s in seeds]
    log.info(f'generating {len(labels)} images: classes {classes}, seeds {seeds}, schedule '
             f'{describe_schedule(args, schedule)}, cfg {args.cfg}, top_k {args.top_k}, top_p {args.top_p}, '
             f'precision {amp_dtype}')
    images = generate(args, var, schedule, solver, subnet, amp_dtype, device, labels, all_seeds, edit=edit,
                      trace=trace)
    for c, s, arr in zip(labels, all_seeds, to_uint8_hwc(images)):
        save_png_atomic(arr, out_dir / f'{prefix}{c}_seed{s}.png')
    if args.save_grid and len(images) < 2:
        log.info('--save_grid: a single image makes no grid (as the official script)')
    elif args.save_grid:
        nrow = args.nrow or (len(seeds) if len(classes) > 1 else official.OFFICIAL_NROW)
        grid = make_grid(images, nrow=nrow, padding=GRID_PAD, pad_value=GRID_PAD_VALUE)
        save_png_atomic(to_uint8_hwc(grid.unsqueeze(0))[0], out_dir / grid_name)
    if trace is not None:
        if not var.use_implicit:
            log.info('--trace: an explicit VAR has no fixed-point iterations to trace')
        else:
            write_trace(trace, var.patch_nums, out_dir / 'trace.json', out_dir / 'trace.png')
    log.info(f'wrote {len(labels)} images to {out_dir}/')
