"""Fixed-point solvers for the implicit block and the stochastic Jacobian-free backward (S-JFB).

A fixed-point map is any callable `f(z, it) -> z'`; `it` is the global iteration index, which the per-iteration
KV cache of cached inference uses. Solvers only decide how to iterate it.
"""
from typing import Callable, List, Optional

import torch

FixedPointMap = Callable[[torch.Tensor, int], torch.Tensor]


def relative_residual(z_new: torch.Tensor, z_old: torch.Tensor) -> float:
    """||z_new - z_old|| / ||z_old|| over the whole tensor (the paper's convergence measure)."""
    z_new, z_old = z_new.float(), z_old.float()
    return ((z_new - z_old).norm() / z_old.norm().clamp_min(1e-12)).item()


def mean_cosine(z_new: torch.Tensor, z_old: torch.Tensor) -> float:
    """Mean over tokens of the cosine similarity between consecutive iterates."""
    return torch.nn.functional.cosine_similarity(z_new.float(), z_old.float(), dim=-1).mean().item()


class FixedPointIteration:
    """Plain (Picard) iteration z <- f(z): the official solver."""

    name = 'picard'

    def solve(self, f: FixedPointMap, z: torch.Tensor, max_iters: int, start_it: int = 0,
              tol: Optional[float] = None, trace: Optional[List[dict]] = None) -> torch.Tensor:
        """Run up to `max_iters` iterations; stop early once the relative residual drops below `tol`.

        With `trace` given, one dict {'it', 'residual', 'cosine'} per iteration is appended (this syncs with the
        device, so only ask for it when measuring).
        """
        if max_iters < 0:
            raise ValueError(f'iteration count must be >= 0, got {max_iters}')
        for t in range(max_iters):
            z_new = f(z, start_it + t)
            if trace is not None or tol is not None:
                res = relative_residual(z_new, z)
                if trace is not None:
                    trace.append({'it': start_it + t, 'residual': res, 'cosine': mean_cosine(z_new, z)})
                z = z_new
                if tol is not None and res < tol:
                    break
            else:
                z = z_new
        return z


def sjfb(f: FixedPointMap, z0: torch.Tensor, num_no_grad: int, num_grad: int,
         solver: Optional[FixedPointIteration] = None) -> torch.Tensor:
    """Stochastic Jacobian-free backprop: `num_no_grad` solver iterations under no_grad, then `num_grad` plain
    iterations that autograd records, so memory does not grow with `num_no_grad`.

    The official code runs the first phase without `torch.no_grad` (it builds and discards a graph); the gradients
    are identical, this keeps memory constant.
    """
    if num_no_grad < 0 or num_grad < 0:
        raise ValueError(f'S-JFB iteration counts must be >= 0, got ({num_no_grad}, {num_grad})')
    if num_no_grad == 0 and num_grad == 0:
        return z0  # zero iterations: the identity, so gradients still reach whatever produced z0
    solver = solver or FixedPointIteration()
    # As in the official code, the recorded iterations start from a detached state: gradient reaches earlier layers
    # only through the input injection that `f` closes over.
    z = z0.detach()
    if num_no_grad > 0:
        with torch.no_grad():
            z = solver.solve(f, z, num_no_grad)
    for t in range(num_grad):
        z = f(z, num_no_grad + t)
    return z
