"""VARiant depth switching: scales 1..N (the bridge) run all D layers, later scales a shared-weight subnet I_d.

The paper's equidistant rule I_d = {floor(i (D-1) / (d-1)) : i = 0..d-1} keeps the first and last layer. The paper
calls these sets nested, but for D = 30 they are not: I_16 = {0, 1, 3, 5, ..., 27, 29} holds no even layer beyond 0,
while I_8 = {0, 4, 8, 12, 16, 20, 24, 29}. The `nested` selection instead takes each subnet equidistantly from the
next larger one of the chain d, 2d, 4d, ... (< D) and D, so that I_d ⊂ I_2d ⊂ ... ⊂ all layers.
"""
from dataclasses import dataclass
from typing import List, Tuple

SELECTIONS = ('equidistant', 'nested')


def equidistant_subnet(D: int, d: int) -> Tuple[int, ...]:
    """The paper's eq. 2: d layer indices out of D, first and last included."""
    if not 2 <= d <= D:
        raise ValueError(f'subnet depth must lie in [2, {D}] (first and last layer are always kept), got {d}')
    return tuple(sorted({i * (D - 1) // (d - 1) for i in range(d)}))


def nested_subnet(D: int, d: int) -> Tuple[int, ...]:
    """d layers chosen so that the subnets of d, 2d, 4d, ... are nested (equidistant within the parent)."""
    chain = [d]
    while chain[-1] * 2 < D:
        chain.append(chain[-1] * 2)
    layers = tuple(range(D))
    for size in reversed(chain):
        positions = equidistant_subnet(len(layers), size)
        layers = tuple(layers[p] for p in positions)
    return layers


@dataclass(frozen=True)
class SubnetSpec:
    """Run-time depth switch: `depth` layers (of the model's D) for every scale after the first `bridge` scales."""
    depth: int
    bridge: int
    selection: str = 'equidistant'

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f'unknown subnet selection {self.selection!r}; choose from {SELECTIONS}')
        if self.bridge < 0:
            raise ValueError(f'bridge must be >= 0 scales, got {self.bridge}')

    def layers(self, D: int) -> Tuple[int, ...]:
        if self.depth == D:
            return tuple(range(D))
        pick = equidistant_subnet if self.selection == 'equidistant' else nested_subnet
        return pick(D, self.depth)

    def layers_per_scale(self, D: int, num_scales: int) -> List[Tuple[int, ...]]:
        """Active layer indices at every scale (a bridge of K scales or more means the full model everywhere)."""
        sub, full = self.layers(D), tuple(range(D))
        return [full if si < self.bridge else sub for si in range(num_scales)]


def subnet_probability(epoch: float, phase1_end: float, phase2_end: float, p_start: float = 0.2) -> float:
    """Probability of training the subnet at `epoch` (VARiant Alg. 1): p_start until phase1_end, then linear to 1
    at phase2_end, then 1 (subnet only)."""
    if not 0 <= phase1_end <= phase2_end:
        raise ValueError(f'phase ends must satisfy 0 <= phase1_end <= phase2_end, got {phase1_end}, {phase2_end}')
    if epoch <= phase1_end:
        return p_start
    if epoch <= phase2_end:
        return p_start + (1 - p_start) * (epoch - phase1_end) / (phase2_end - phase1_end)
    return 1.0
