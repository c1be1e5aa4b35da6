"""Per-scale iteration schedules of the implicit block at sampling time (VIAR's compute knob).

A schedule turns the number of scales K into a cap on fixed-point iterations per scale and, for the adaptive
schedule, a tolerance on the relative residual ||z_{t+1} - z_t|| / ||z_t|| that stops a scale early.
Text form for CLIs (`parse_schedule`): `const:N`, `linear:LEFT,RIGHT`, `list:N1,N2,...`, `adaptive:TOL,CAP`,
`budget:ITERS[,CAP]` (a total of implicit iterations over all scales) and `flops:GFLOPS[,CAP]` (a total of implicit
GFLOPs per image); the two budget kinds are turned into per-scale counts by `allocate_budget` from measured
residual curves (`models.sampler.resolve_schedule` measures them on the model).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np


class ScheduleError(ValueError):
    """An iteration schedule that cannot be used (negative counts, wrong length, bad tolerance)."""


MAX_ITERS_PER_SCALE = 1000  # fixed-point iterations converge in tens; a larger count is a typo that never finishes


def _check_count(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ScheduleError(f'{what} must be a non-negative integer, got {n!r}')
    if n > MAX_ITERS_PER_SCALE:
        raise ScheduleError(f'{what} {n} is above the limit of {MAX_ITERS_PER_SCALE} iterations per scale')
    return int(n)


@dataclass(frozen=True)
class IterSchedule:
    """Base class: `caps(K)` iteration caps per scale; `tol` an optional early-stop tolerance."""

    def caps(self, num_scales: int) -> List[int]:
        raise NotImplementedError

    @property
    def tol(self) -> Optional[float]:
        return None

    @property
    def is_constant(self) -> bool:
        """True when every scale runs the same number of iterations (cached inference = teacher forcing)."""
        return False


@dataclass(frozen=True)
class ConstantSchedule(IterSchedule):
    """The same number of iterations at every scale."""
    iters: int

    def __post_init__(self):
        _check_count(self.iters, 'constant schedule iterations')

    def caps(self, num_scales: int) -> List[int]:
        return [self.iters] * num_scales

    @property
    def is_constant(self) -> bool:
        return True

    def __str__(self) -> str:
        return f'const:{self.iters}'


@dataclass(frozen=True)
class LinearSchedule(IterSchedule):
    """Linear from `left` (coarsest scale) to `right` (finest), truncated to int: the official `iters_list`.

    The official code always builds 10 entries (np.linspace(left, right, 10, dtype=int)); for the released
    10-scale models this is identical. For other scale counts we interpolate over the actual K scales.
    """
    left: int
    right: int

    def __post_init__(self):
        _check_count(self.left, 'iter_left')
        _check_count(self.right, 'iter_right')

    def caps(self, num_scales: int) -> List[int]:
        return np.linspace(self.left, self.right, num_scales, dtype=int).tolist()

    @property
    def is_constant(self) -> bool:
        return self.left == self.right

    def __str__(self) -> str:
        return f'linear:{self.left},{self.right}'


@dataclass(frozen=True)
class ListSchedule(IterSchedule):
    """An explicit iteration count per scale."""
    iters: Tuple[int, ...]

    def __post_init__(self):
        if len(self.iters) == 0:
            raise ScheduleError('an explicit schedule needs one iteration count per scale, got an empty list')
        object.__setattr__(self, 'iters', tuple(_check_count(n, 'iteration count') for n in self.iters))

    def caps(self, num_scales: int) -> List[int]:
        if len(self.iters) != num_scales:
            raise ScheduleError(f'schedule lists {len(self.iters)} iteration counts but the model has {num_scales} '
                                f'scales')
        return list(self.iters)

    @property
    def is_constant(self) -> bool:
        return len(set(self.iters)) == 1

    def __str__(self) -> str:
        return 'list:' + ','.join(map(str, self.iters))


@dataclass(frozen=True)
class AdaptiveSchedule(IterSchedule):
    """Iterate each scale until the relative residual falls below `tolerance`, at most `cap` times."""
    tolerance: float
    cap: int

    def __post_init__(self):
        if not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance < float('inf')):
            raise ScheduleError(f'adaptive tolerance must be a positive number, got {self.tolerance!r}')
        _check_count(self.cap, 'adaptive iteration cap')

    def caps(self, num_scales: int) -> List[int]:
        return [self.cap] * num_scales

    @property
    def tol(self) -> Optional[float]:
        return float(self.tolerance)

    def __str__(self) -> str:
        return f'adaptive:{self.tolerance:g},{self.cap}'


@dataclass(frozen=True)
class BudgetSchedule(IterSchedule):
    """A total budget (implicit iterations, or GFLOPs per image) to split over the scales (paper eq. 12-13).

    It has no per-scale counts until resolved against a model's measured convergence.
    """
    budget: float
    unit: str = 'iters'  # 'iters' or 'gflops'
    cap: int = 12        # at most this many iterations per scale (also the calibration depth)

    def __post_init__(self):
        if self.unit not in ('iters', 'gflops'):
            raise ScheduleError(f'budget unit must be iters or gflops, got {self.unit!r}')
        if not (isinstance(self.budget, (int, float)) and 0 < self.budget < float('inf')):
            raise ScheduleError(f'budget must be a positive number, got {self.budget!r}')
        _check_count(self.cap, 'budget cap')

    def caps(self, num_scales: int) -> List[int]:
        raise ScheduleError(f'{self} must be resolved against a model first (models.sampler.resolve_schedule)')

    def __str__(self) -> str:
        return f'{"budget" if self.unit == "iters" else "flops"}:{self.budget:g},{self.cap}'


def allocate_budget(residual_curves: Sequence[Sequence[float]], costs: Sequence[float], budget: float,
                    min_iters: int = 1, max_iters: Optional[int] = None,
                    weights: Optional[Sequence[float]] = None) -> ListSchedule:
    """Choose per-scale counts n_k with sum_k costs[k] * n_k <= budget that minimise sum_k w_k E_k(n_k).

    E_k(n) = residual_curves[k][n], the relative fixed-point residual a scale shows after n iterations (a proxy
    for its distance to equilibrium, measured by tracing the solver), defined for n < len(curve). Greedy marginal
    allocation: every step buys the iteration with the largest error drop per unit cost; optimal for convex,
    decreasing curves, which is how fixed-point residuals behave.
    """
    K = len(residual_curves)
    if len(costs) != K or (weights is not None and len(weights) != K):
        raise ScheduleError(f'{K} residual curves but {len(costs)} costs / {len(weights or costs)} weights')
    if any(len(c) == 0 for c in residual_curves) or any(c <= 0 for c in costs):
        raise ScheduleError('every scale needs a non-empty residual curve and a positive cost')
    weights = weights or [1.0] * K
    limit = [len(c) - 1 if max_iters is None else min(len(c) - 1, max_iters) for c in residual_curves]
    n = [min(min_iters, lim) for lim in limit]
    spent = sum(c * k for c, k in zip(costs, n))
    if spent > budget + 1e-9:
        raise ScheduleError(f'budget {budget:g} is below the cost of {min_iters} iteration(s) per scale ({spent:g})')
    while True:
        best, best_gain = None, 0.0
        for k in range(K):
            if n[k] < limit[k] and spent + costs[k] <= budget + 1e-9:
                gain = weights[k] * (residual_curves[k][n[k]] - residual_curves[k][n[k] + 1]) / costs[k]
                if gain > best_gain:
                    best, best_gain = k, gain
        if best is None:
            return ListSchedule(tuple(n))
        n[best] += 1
        spent += costs[best]


def parse_schedule(spec: str) -> IterSchedule:
    """Parse the CLI form (see the module docstring)."""
    kind, _, arg = spec.strip().partition(':')
    parts = [p for p in arg.replace(' ', '').split(',') if p != '']
    try:
        if kind == 'const' and len(parts) == 1:
            return ConstantSchedule(int(parts[0]))
        if kind == 'linear' and len(parts) == 2:
            return LinearSchedule(int(parts[0]), int(parts[1]))
        if kind == 'list':
            return ListSchedule(tuple(int(p) for p in parts))
        if kind == 'adaptive' and len(parts) == 2:
            return AdaptiveSchedule(float(parts[0]), int(parts[1]))
        if kind in ('budget', 'flops') and len(parts) in (1, 2):
            cap = {'cap': int(parts[1])} if len(parts) == 2 else {}
            return BudgetSchedule(float(parts[0]), unit='iters' if kind == 'budget' else 'gflops', **cap)
    except ValueError as e:
        if isinstance(e, ScheduleError):
            raise
        raise ScheduleError(f'cannot parse schedule {spec!r}: {e}') from None
    raise ScheduleError(f'unknown schedule {spec!r}; use const:N, linear:LEFT,RIGHT, list:N1,N2,..., '
                        f'adaptive:TOL,CAP, budget:ITERS[,CAP] or flops:GFLOPS[,CAP]')
