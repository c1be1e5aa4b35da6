"""Fixed-point solvers for the implicit block (models/implicit.py): plain (Picard) iteration and Anderson acceleration.

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


class AndersonAcceleration:
    """Anderson acceleration (type II, mixing beta): extrapolates from the last `memory` iterates.

    Each iteration costs one evaluation of f, as in plain iteration, so iteration budgets compare directly. The
    returned state is the last evaluation f(x_k), which is what the caches saw last.
    """

    name = 'anderson'

    def __init__(self, memory: int = 5, beta: float = 1.0, lam: float = 1e-4):
        if memory < 1:
            raise ValueError(f'Anderson memory must be >= 1, got {memory}')
        self.memory, self.beta, self.lam = memory, beta, lam

    def solve(self, f: FixedPointMap, z: torch.Tensor, max_iters: int, start_it: int = 0,
              tol: Optional[float] = None, trace: Optional[List[dict]] = None) -> torch.Tensor:
        if max_iters < 0:
            raise ValueError(f'iteration count must be >= 0, got {max_iters}')
        bsz, shape = z.shape[0], z.shape
        X, G = [], []  # recent iterates x_i and residuals g_i = f(x_i) - x_i, flattened per batch element, fp32
        x = z
        fx = z
        for t in range(max_iters):
            fx = f(x, start_it + t)
            x_flat, fx_flat = x.reshape(bsz, -1).float(), fx.reshape(bsz, -1).float()
            res = ((fx_flat - x_flat).norm() / x_flat.norm().clamp_min(1e-12)).item() if (trace is not None or
                                                                                          tol is not None) else None
            if trace is not None:
                trace.append({'it': start_it + t, 'residual': res, 'cosine': mean_cosine(fx, x)})
            if (tol is not None and res < tol) or t == max_iters - 1:
                break
            X.append(x_flat)
            G.append(fx_flat - x_flat)
            if len(X) > self.memory:
                X.pop(0)
                G.pop(0)
            x = self._mix(X, G).view(shape).to(z.dtype)
        return fx

    def _mix(self, X: List[torch.Tensor], G: List[torch.Tensor]) -> torch.Tensor:
        """argmin_alpha ||sum alpha_i g_i|| s.t. sum alpha_i = 1, then x = sum alpha_i (x_i + beta g_i)."""
        Xs, Gs = torch.stack(X, 1), torch.stack(G, 1)  # bsz, n, d
        n = Xs.shape[1]
        H = torch.bmm(Gs, Gs.transpose(1, 2))
        H = H + self.lam * H.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(1e-12).unsqueeze(-1) * \
            torch.eye(n, device=H.device)
        ones = torch.ones(Xs.shape[0], n, 1, device=H.device)
        w = torch.linalg.solve(H, ones)
        alpha = w / w.sum(1, keepdim=True)  # bsz, n, 1
        return (alpha * (Xs + self.beta * Gs)).sum(1)


SOLVERS = {'picard': FixedPointIteration, 'anderson': AndersonAcceleration}


def make_solver(name: str):
    """A solver by name ('picard' is the official plain iteration)."""
    if name not in SOLVERS:
        raise ValueError(f'unknown solver {name!r}; choose from {sorted(SOLVERS)}')
    return SOLVERS[name]()
