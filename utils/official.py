"""Where the official VAR/VIAR `sampling.py` and `gen_img.py` write, and which checkpoint they pick by default.

sampling.py: a run whose images are drawn with the official knobs gets the official name,
`implicit-<ckpt file>-cfg-<cfg>-seed-<seed>` for VIAR or `d<depth>-<ckpt file>-cfg-<cfg>-seed-<seed>` for VAR. Every
knob the official name cannot express is appended when it differs from the official setting, in a fixed order:
the iteration schedule (unless `linear:10,10`), the KV policy, the solver, the VARiant subnet, `topk<k>`, `topp<p>`,
`smooth`. So two runs that draw different images never share a name. The extent of a run (`--classes`,
`--per_class`, `--batch_size`) and its precision are not in the name: the knobs saved beside the run refuse a
resume with other values.

gen_img.py: `--output_dir DIR` (the official spelling, default gen_images) writes into `DIR/<checkpoint stem>/` with
the official grid name; `--out_dir DIR` writes straight into DIR with `grid.png`.
"""
from pathlib import Path
from typing import List, Optional, Sequence

OFFICIAL_SCHEDULE = 'linear:10,10'   # scripts/eval.sh: --iter_left 10 --iter_right 10
OFFICIAL_TOP_K, OFFICIAL_TOP_P = 900, 0.96
OFFICIAL_KV_POLICY, OFFICIAL_SOLVER = 'per_iteration', 'picard'
OFFICIAL_VAR_DEPTH = 30              # gen_img.py --depth default
OFFICIAL_GEN_DIR = 'gen_images'
OFFICIAL_NROW = 4                    # gen_img.py grid columns
CKPT_DIR = Path('ckpts')
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
        parts.append(f'topp{args.top_p:g}')
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
