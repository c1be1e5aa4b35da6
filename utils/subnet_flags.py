"""The VARiant subnet flags, defined once for sampling (run-time depth switching) and supernet training."""
import argparse

from models.subnet import SELECTIONS
from utils.cli import NON_NEGATIVE, POSITIVE, UserError

DEFAULT_BRIDGE = 6  # the paper's N: scales 1-6 of 10 always run all layers


def add_subnet_flags(group: argparse._ArgumentGroup, depth_help: str):
    """--subnet_depth (what it does is the caller's `depth_help`), --bridge and --subnet_selection."""
    group.add_argument('--subnet_depth', type=POSITIVE, default=None, metavar='d', help=depth_help)
    group.add_argument('--bridge', type=NON_NEGATIVE, default=None, metavar='N',
                       help=f'VARiant: the first N scales always run all layers (default {DEFAULT_BRIDGE} as the '
                            'paper, at most the number of scales - 1)')
    group.add_argument('--subnet_selection', choices=SELECTIONS, default='equidistant',
                       help="VARiant layer choice: the paper's equidistant rule, or nested across d, 2d, 4d, ...")


def bridge_from_args(args, num_scales: int) -> int:
    """--bridge, or the paper's default capped so that at least the last scale runs the subnet."""
    bridge = min(DEFAULT_BRIDGE, num_scales - 1) if args.bridge is None else args.bridge
    if not 0 <= bridge < num_scales:
        raise UserError(f'--bridge must lie in [0, {num_scales - 1}]: the tokenizer has {num_scales} scales and the '
                        f'subnet needs at least one, got {args.bridge}')
    return bridge
