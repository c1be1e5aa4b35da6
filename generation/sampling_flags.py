"""The sampling knobs of sampling.py and gen_img.py: guidance, top-k/p (checked by the sampler's own check), the
implicit-iteration schedule (by default the checkpoint's own; a budget is resolved by calibration sampling), KV policy,
solver, VARiant subnet, torch.compile, and the class/seed lists."""
import argparse
from typing import Callable, List, Optional

from models import VAR
from models.fixed_point import SOLVERS, make_solver
from models.kv_cache import KV_POLICIES
from models.sampler import check_sampling_args, compiled_trunk_step, default_schedule, resolve_schedule
from models.schedules import IterSchedule, LinearSchedule, parse_schedule
from models.subnet import SubnetSpec, equidistant_subnet
from utils.cli import ITERS, UserError
from utils.subnet_flags import add_subnet_flags, bridge_from_args

MAX_IDS = 10_000  # --seeds / --classes entries per run (gen_img keeps every image in memory)
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune')


def sampling_knob(name: str, convert: Callable[[str], float]) -> Callable[[str], float]:
    """argparse type of the sampling knob `name`: converted, then checked by the sampler's own check."""

    def parse(text: str):
        try:
            value = convert(text)
            check_sampling_args(**{name: value})
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = name
    return parse


def add_sampling_args(parser: argparse.ArgumentParser, top_k: int = 900, top_p: float = 0.96):
    g = parser.add_argument_group('sampling')
    g.add_argument('--cfg', type=sampling_knob('cfg', float), default=1.5,
                   help='classifier-free guidance, ramped linearly over scales')
    g.add_argument('--top_k', type=sampling_knob('top_k', int), default=top_k,
                   help='keep the k most likely tokens (0: all)')
    g.add_argument('--top_p', type=sampling_knob('top_p', float), default=top_p,
                   help='nucleus mass in [0, 1] (0: off)')
    g.add_argument('--more_smooth', action='store_true', help='Gumbel-softmax token mixing (not for FID)')
    g.add_argument('--schedule', default=None,
                   help='implicit iterations per scale: const:N, linear:LEFT,RIGHT, list:N1,..., adaptive:TOL,CAP, '
                        "budget:ITERS[,CAP] or flops:GFLOPS[,CAP] (default: the checkpoint's own schedule, "
                        'const:EVAL_ITERS with the iterations it was validated at, or linear:ITER_LEFT,ITER_RIGHT '
                        'when either is given)')
    g.add_argument('--iter_left', type=ITERS, default=None,
                   help="official linear schedule: iterations at scale 1 (default: the checkpoint's eval_iters)")
    g.add_argument('--iter_right', type=ITERS, default=None,
                   help="official linear schedule: at the last scale (default: the checkpoint's eval_iters)")
    g.add_argument('--kv_policy', default='per_iteration', choices=KV_POLICIES,
                   help='implicit-block KV cache: per_iteration (official) or lean (one cache, any schedule)')
    g.add_argument('--solver', default='picard', choices=sorted(SOLVERS), help='fixed-point solver')
    add_subnet_flags(g, 'VARiant (explicit VAR only): run the scales after the bridge with d shared layers')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                   help='torch.compile the per-scale trunk step (static shapes: one graph per scale; the first batch '
                        'pays the compilation)')
    g.add_argument('--compile_mode', default='default', choices=COMPILE_MODES,
                   help="torch.compile mode; 'reduce-overhead' adds CUDA graphs on a GPU")


def trunk_step_from_args(args) -> Optional[Callable]:
    """The compiled per-scale trunk step when --compile, else None (the plain `models.trunk.run_trunk`)."""
    if not args.compile:
        return None
    return compiled_trunk_step(mode=None if args.compile_mode == 'default' else args.compile_mode)


def schedule_is_the_checkpoints(args) -> bool:
    """Whether no flag chose a schedule, so sampling runs the checkpoint's own (`default_schedule`)."""
    return args.schedule is None and args.iter_left is None and args.iter_right is None


def describe_schedule(args, schedule: IterSchedule) -> str:
    """The schedule as a run's log and .json show it: its text form, marked when it is the checkpoint's own."""
    return f"{schedule} (the checkpoint's own)" if schedule_is_the_checkpoints(args) else str(schedule)


def schedule_from_args(args, var: VAR, calibration_seed: int = 0) -> IterSchedule:
    """The per-scale schedule asked for (by default the checkpoint's own), validated against the model (budgets are
    resolved by calibration)."""
    eval_iters = var.config.eval_iters
    if args.schedule:
        schedule = parse_schedule(args.schedule)
    elif schedule_is_the_checkpoints(args):
        schedule = default_schedule(var)
    else:
        schedule = LinearSchedule(eval_iters if args.iter_left is None else args.iter_left,
                                  eval_iters if args.iter_right is None else args.iter_right)
    solver = make_solver(args.solver)
    schedule = resolve_schedule(var, schedule, seed=calibration_seed, cfg=args.cfg, kv_policy=args.kv_policy,
                                solver=solver)
    check_sampling_args(var, schedule=schedule)
    return schedule


def subnet_from_args(args, var: VAR) -> Optional[SubnetSpec]:
    """The VARiant subnet asked for, validated against the model (None = full depth everywhere)."""
    if args.subnet_depth is None:
        return None
    if var.use_implicit:
        raise UserError('--subnet_depth applies to explicit VAR models; for VIAR use --schedule')
    if not 2 <= args.subnet_depth <= var.depth:
        raise UserError(f'--subnet_depth must lie in [2, {var.depth}], got {args.subnet_depth}')
    equidistant_subnet(var.depth, args.subnet_depth)
    return SubnetSpec(args.subnet_depth, bridge_from_args(args, len(var.patch_nums)), args.subnet_selection)


def parse_ids(spec: str, what: str, lo: Optional[int] = None, hi: Optional[int] = None) -> List[int]:
    """'A-B' (inclusive) | 'a,b,c' -> list of at most MAX_IDS ints, each in [lo, hi] when given, or a one-line error
    naming the flag."""
    try:
        if '-' in spec and ',' not in spec and not spec.startswith('-'):
            first, last = (int(x) for x in spec.split('-'))
            if last - first + 1 > MAX_IDS:
                raise UserError(f'--{what} {spec!r} selects {last - first + 1} ids, more than the limit of {MAX_IDS} '
                                f'per run; split it over several runs')
            ids = list(range(first, last + 1))
        else:
            ids = [int(x) for x in spec.split(',') if x.strip()]
    except ValueError:
        raise UserError(f"cannot parse --{what} {spec!r}; use e.g. '3', '0-9' or '1,5'") from None
    if not ids:
        raise UserError(f'--{what} {spec!r} selects nothing')
    if len(ids) > MAX_IDS:
        raise UserError(f'--{what} selects {len(ids)} ids, more than the limit of {MAX_IDS} per run')
    bad = [i for i in ids if (lo is not None and i < lo) or (hi is not None and i > hi)]
    if bad:
        raise UserError(f'--{what} {bad[0]} is out of range: ids must lie in [{lo}, {hi}]')
    return ids


def parse_classes(spec: str, num_classes: int) -> List[int]:
    """'all' or `parse_ids` syntax -> distinct class ids, each checked against the model's classes."""
    classes = list(range(num_classes)) if spec == 'all' else parse_ids(spec, 'classes')
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f'class ids {bad[:5]} are out of range: the model has classes 0..{num_classes - 1}')
    if len(set(classes)) != len(classes):
        raise UserError(f'--classes {spec!r} repeats a class')
    return classes
