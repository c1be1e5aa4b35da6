"""The official VAR/VIAR command lines: where their sampling.py and gen_img.py write, and the train.py flags we add.

sampling.py: a run whose images are drawn with the official knobs gets the official name,
`implicit-<ckpt file>-cfg-<cfg>-seed-<seed>` for VIAR or `d<depth>-<ckpt file>-cfg-<cfg>-seed-<seed>` for VAR. Every
knob the official name cannot express is appended when it differs from the official setting, in a fixed order:
the iteration schedule (unless `linear:10,10`), the KV policy, the solver, the VARiant subnet, `topk<k>`, `topp<p>`,
`smooth`. So two runs that draw different images never share a name. The extent of a run (`--classes`,
`--per_class`, `--batch_size`) and its precision are not in the name: the knobs saved beside the run refuse a
resume with other values.

train.py: the official flags with no spelling among ours are added by `add_official_train_flags`.

gen_img.py: `--output_dir DIR` (the official spelling, default gen_images) writes into `DIR/<checkpoint stem>/` with
the official grid name; `--out_dir DIR` writes straight into DIR with `grid.png`.
"""
import argparse
from pathlib import Path
from typing import List, Optional, Sequence

from utils.cli import NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, UserError

OFFICIAL_SCHEDULE = 'linear:10,10'   # scripts/eval.sh: --iter_left 10 --iter_right 10
OFFICIAL_TOP_K, OFFICIAL_TOP_P = 900, 0.96
OFFICIAL_KV_POLICY, OFFICIAL_SOLVER = 'per_iteration', 'picard'
OFFICIAL_VAR_DEPTH = 30              # gen_img.py --depth default
OFFICIAL_GEN_DIR = 'gen_images'
OFFICIAL_NROW = 4                    # gen_img.py grid columns
CKPT_DIR = Path('ckpts')
COMPILE_MODES = (0, 1, 2, 3)         # official --tfast/--vfast: off, reduce-overhead, max-autotune, default
NAME_LIST_SHOWN = 4                  # the official grid name lists the first 4 seeds, then `_etc<count>`


def sample_run_name(ckpt, implicit: bool, depth: int, cfg: float, seed: int, extras: Sequence[str] = ()) -> str:
    """The official sampling.py run name, followed by `extras` (the knobs it cannot express) joined by '-'."""
    prefix = 'implicit' if implicit else f'd{depth}'
    official = f'{prefix}-{Path(ckpt).name}-cfg-{float(cfg)}-seed-{seed}'  # str(float) as the official f-string
    return '-'.join([official, *extras])


def non_official_knobs(args, implicit: bool, schedule, subnet) -> List[str]:
    """Name parts for the sampling knobs that differ from the official evaluation's, in a fixed order."""
    parts = []
    if implicit:
        if str(schedule) != OFFICIAL_SCHEDULE:
            parts.append(str(schedule).replace(':', '').replace(',', '-'))
        parts += [value for value, official in ((args.kv_policy, OFFICIAL_KV_POLICY), (args.solver, OFFICIAL_SOLVER))
                  if value != official]
    if subnet is not None:
        parts.append(f'd{subnet.depth}N{subnet.bridge}-{subnet.selection}')
    if args.top_k != OFFICIAL_TOP_K:
        parts.append(f'topk{args.top_k}')
    if args.top_p != OFFICIAL_TOP_P:
        parts.append(f'topp{args.top_p}')  # str(float): distinct values, distinct names
    if args.more_smooth:
        parts.append('smooth')
    return parts


def default_gen_ckpt(use_implicit: Optional[bool], depth: Optional[int]) -> Path:
    """gen_img.py without a checkpoint: ckpts/var_d<depth>.pth when VAR is asked for (`--no-use_implicit`, or
    `--depth` without `--use_implicit`, as the official script), else ckpts/viar.pth."""
    if use_implicit is False or (use_implicit is None and depth is not None):
        return CKPT_DIR / f'var_d{depth or OFFICIAL_VAR_DEPTH}.pth'
    return CKPT_DIR / 'viar.pth'


def gen_output_dir(out_dir: Optional[str], output_dir: Optional[str], ckpt) -> Path:
    """gen_img.py's folder: --out_dir itself, else <--output_dir>/<checkpoint file name without .pth> (official)."""
    if out_dir is not None:
        return Path(out_dir)
    return Path(output_dir or OFFICIAL_GEN_DIR) / Path(ckpt).name.replace('.pth', '')


def _ids(ids: Sequence[int]) -> str:
    shown = '_'.join(str(i) for i in ids[:NAME_LIST_SHOWN])
    return shown + (f'_etc{len(ids)}' if len(ids) > NAME_LIST_SHOWN else '')


def grid_name(prefix: str, classes: Sequence[int], seeds: Sequence[int]) -> str:
    """The official grid file name, e.g. class970_seeds10_11_12_13_etc10_grid.png (several classes: class1_2_...)."""
    return f'{prefix}{_ids(classes)}_seeds{_ids(seeds)}_grid.png'


def add_official_train_flags(parser: argparse.ArgumentParser):
    """The official train.py flags (utils/arg_util.py) that have no spelling among ours."""
    g = parser.add_argument_group('official flags without a counterpart', 'the official fields marked "automatically '
                                  'set" and its developer switches (local_debug, dbg_nan) are not flags here')
    g.add_argument('--exp_name', default=None, help='experiment name (logged)')
    g.add_argument('--tfast', type=int, default=0, choices=COMPILE_MODES,
                   help='official torch.compile mode of the transformer: any non-zero mode turns on --compile')
    g.add_argument('--vfast', type=int, default=0, choices=COMPILE_MODES,
                   help='official torch.compile of the tokenizer: no effect (the frozen tokenizer is not compiled)')
    g.add_argument('--opt', default='adamw', choices=('adamw',), help='optimizer (the official Lion is not offered)')
    g.add_argument('--afuse', action=argparse.BooleanOptionalAction, default=True, help='fused AdamW (one kernel over all parameters, on CUDA and on a CPU)')
    g.add_argument('--fuse', action=argparse.BooleanOptionalAction, default=True,
                   help='official fused kernels (flash-attn, xformers): no effect, attention is always SDPA')
    g.add_argument('--patch_size', type=POSITIVE, default=None,
                   help='pixels per finest-scale token: checked against the tokenizer (16 for the released one)')
    g.add_argument('--pg', type=NON_NEGATIVE_FLOAT, default=0.0,
                   help='official progressive training: only 0 (off, as for the released models) is supported')
    g.add_argument('--pg0', type=POSITIVE, default=4, help='first scale of progressive training (only used with --pg)')
    g.add_argument('--pgwp', type=NON_NEGATIVE_FLOAT, default=0.0,
                   help='warm-up epochs per progressive stage (only with --pg)')
    g.add_argument('--same_seed_for_all_ranks', type=NON_NEGATIVE, default=0,
                   help='official offset of the data-order seed: only 0 (use --seed)')


def apply_official_train_flags(args, image_size: int, patch_nums: Sequence[int]) -> List[str]:
    """Check the official-only train flags, turn --tfast into --compile, and return lines to log."""
    if args.pg > 0:
        raise UserError(f'--pg {args.pg}: progressive training is not implemented (the released models used --pg 0)')
    if args.same_seed_for_all_ranks:
        raise UserError('--same_seed_for_all_ranks: only 0 is supported; --seed sets the data order')
    patch = image_size // max(patch_nums)
    if args.patch_size is not None and args.patch_size != patch:
        raise UserError(f'--patch_size {args.patch_size} does not match the tokenizer: {image_size} px over a '
                        f'{max(patch_nums)}x{max(patch_nums)} finest scale is {patch} px per token')
    notes = [f'experiment name: {args.exp_name}'] if args.exp_name else []
    if args.tfast:
        args.compile = True
        notes.append(f'--tfast {args.tfast}: compiling the transformer blocks (torch.compile default mode)')
    if args.vfast:
        notes.append(f'--vfast {args.vfast}: no effect here (the frozen tokenizer is not compiled)')
    if not args.fuse:
        notes.append('--fuse False: no effect here (attention is always scaled_dot_product_attention)')
    return notes
