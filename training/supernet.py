"""VARiant progressive supernet training (paper §3.3, Alg. 1): the flags, their checks, and the per-step draw.

Every optimizer step trains either the full model or the subnet (the scales after the bridge run only the layers
I_d), the subnet with probability p: `--subnet_p_start` during phase 1, rising linearly to 1 during phase 2, and 1
(subnet only) for the rest of --ep (phase 3). Alg. 1 changes p once per epoch; here the epoch is fractional
(iteration / iterations per epoch), so p rises smoothly through phase 2 and a run of a few iterations can pass through
all three phases (fractional --phase1_epochs / --phase2_epochs are accepted).

The draw of optimizer step s is a pure function of (--seed, s). So every rank runs the same architecture in a step
(the averaged gradient belongs to one architecture, and without a bridge DDP sees the same unused layers on every
rank), all micro-batches of an accumulated step agree, and a resumed run continues the same sequence: the
checkpoint's iteration is the generator's whole state, and it does not depend on the world size.
"""
import logging
import random
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from models.subnet import SubnetSpec, subnet_probability
from training.seeds import STREAM_SUBNET, mix_seed
from utils.cli import NON_NEGATIVE_FLOAT, PROBABILITY, UserError
from utils.subnet_flags import add_subnet_flags, bridge_from_args

log = logging.getLogger('viar')

DEFAULT_PHASE1_EPOCHS, DEFAULT_PHASE2_EPOCHS = 5.0, 15.0  # the paper's Table 7 (phase 3: 5-15 epochs by depth)
DEFAULT_P_START = 0.2                                  # phase 1's subnet probability (the paper's 2:8)


def add_supernet_flags(p):
    g = p.add_argument_group('VARiant supernet', 'progressive supernet training of an explicit VAR (VARiant Alg. 1), '
                                                 'usually fine-tuning a trained model (--init_from)')
    add_subnet_flags(g, 'train a supernet: each optimizer step runs either the full model or, with the probability of '
                        'the phase schedule, d shared layers for the scales after the bridge (off when not given)')
    g.add_argument('--phase1_epochs', type=NON_NEGATIVE_FLOAT, default=DEFAULT_PHASE1_EPOCHS,
                   help='phase 1: the subnet with probability --subnet_p_start (fractions allowed)')
    g.add_argument('--phase2_epochs', type=NON_NEGATIVE_FLOAT, default=DEFAULT_PHASE2_EPOCHS,
                   help='phase 2: the probability rises linearly to 1; phase 3 (subnet only) is the rest of --ep')
    g.add_argument('--subnet_p_start', type=PROBABILITY, default=DEFAULT_P_START, help='subnet probability in phase 1')
    return g


@dataclass(frozen=True)
class Supernet:
    """The subnet trained alongside the full model and the schedule that picks one of them per optimizer step."""
    spec: SubnetSpec
    phase1_epochs: float
    phase2_epochs: float
    p_start: float
    seed: int
    iters_per_epoch: int    # micro-batches per epoch
    accum: int              # micro-batches per optimizer step

    def probability(self, it: int) -> float:
        """Subnet probability of the optimizer step holding micro-batch `it`, at the fractional epoch of its first
        micro-batch."""
        epoch = (it - it % self.accum) / self.iters_per_epoch
        return subnet_probability(epoch, self.phase1_epochs, self.phase1_epochs + self.phase2_epochs, self.p_start)

    def draw(self, it: int) -> Tuple[float, bool]:
        """(probability, whether to run the subnet) for micro-batch `it`: the same on every rank and micro-batch of
        its optimizer step."""
        p = self.probability(it)
        u = random.Random(mix_seed(self.seed, STREAM_SUBNET, it // self.accum)).random()
        return p, u < p

    def config(self, depth: int) -> Dict[str, Any]:
        """What a checkpoint records (and a resumed run must match)."""
        return {'depth': self.spec.depth, 'bridge': self.spec.bridge, 'selection': self.spec.selection,
                'layers': list(self.spec.layers(depth)), 'phase1_epochs': self.phase1_epochs,
                'phase2_epochs': self.phase2_epochs, 'p_start': self.p_start}

    def describe(self, depth: int, num_scales: int, epochs: int) -> str:
        rest = max(epochs - self.phase1_epochs - self.phase2_epochs, 0)
        return (f'{self.spec.selection} subnet of {self.spec.depth}/{depth} layers {list(self.spec.layers(depth))} '
                f'after a bridge of {self.spec.bridge}/{num_scales} scales | p(subnet) {self.p_start:g} for '
                f'{self.phase1_epochs:g} epoch(s), linear to 1 over {self.phase2_epochs:g}, then 1 for {rest:g}')


def supernet_from_args(args, use_implicit: bool, depth: int, num_scales: int, iters_per_epoch: int,
                       accum: int) -> Optional[Supernet]:
    """The supernet asked for by the flags, checked against the model (None without --subnet_depth)."""
    if args.subnet_depth is None:
        return None
    if use_implicit:
        raise UserError('--subnet_depth (VARiant supernet training) applies to explicit VAR models, not VIAR; drop '
                        '--subnet_depth or --use_implicit')
    if not 2 <= args.subnet_depth < depth:
        raise UserError(f'--subnet_depth must lie in [2, {depth - 1}] for a {depth}-layer model (the first and last '
                        f'layers are always kept), got {args.subnet_depth}')
    bridge = bridge_from_args(args, num_scales)
    e1, e2 = args.phase1_epochs, args.phase2_epochs
    if e1 + e2 > args.epochs:
        raise UserError(f'--phase1_epochs {e1:g} and --phase2_epochs {e2:g} must fit in --ep {args.epochs} (phase 3 '
                        f'is the rest)')
    return Supernet(SubnetSpec(args.subnet_depth, bridge, args.subnet_selection), e1, e2, args.subnet_p_start,
                    args.seed, iters_per_epoch, accum)
