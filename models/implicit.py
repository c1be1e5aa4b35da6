"""VIAR's implicit block: the fusion MLP, the fixed-point map it defines with the weight-tied block, and the loop.

One implicit step is z <- ImplicitBlock(FusionMLP(z, u)) for the input injection u (the pre-blocks' output): the
fusion MLP replaces the explicit residual of a deep-equilibrium layer. `solve_implicit` iterates it. Training uses
the stochastic Jacobian-free backward (S-JFB): `no_grad_iters` solver iterations under no_grad, then `grad_iters`
iterations that autograd records. Sampling runs `no_grad_iters` iterations per scale (its schedule) with the KV
caches of `models.kv_cache`. The solvers themselves (plain Picard, Anderson) live in `models.fixed_point`.
"""
from typing import List, Optional

import torch
import torch.nn as nn

from .blocks import AdaLNSelfAttn, mlp_activation
from .fixed_point import FixedPointIteration, FixedPointMap


class FusionMLP(nn.Sequential):
    """Linear(2C, 2C) - GELU (tanh by default) - Linear(2C, C) over concat(hidden state z, input injection u).

    A Sequential so that the state-dict keys stay the official `implicit_block_projection.{0,2}.*`.
    """

    def __init__(self, embed_dim: int, act: str = 'gelu_tanh'):
        super().__init__(nn.Linear(2 * embed_dim, 2 * embed_dim), mlp_activation(act),
                         nn.Linear(2 * embed_dim, embed_dim))

    def forward(self, z_BLC: torch.Tensor, u_BLC: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat((z_BLC, u_BLC), dim=-1))


def implicit_map(fusion: FusionMLP, block: AdaLNSelfAttn, u_BLC: torch.Tensor, cond: torch.Tensor,
                 attn_bias: Optional[torch.Tensor], caches=None) -> FixedPointMap:
    """The fixed-point map z -> block(fusion(z, u)) for injection u; `caches` (sampling) are keyed by iteration."""

    def f(z_BLC: torch.Tensor, it: int) -> torch.Tensor:
        return block(fusion(z_BLC, u_BLC), cond, attn_bias, None if caches is None else caches[it])

    return f


def sjfb(f: FixedPointMap, z0: torch.Tensor, no_grad_iters: int, grad_iters: int,
         solver: Optional[FixedPointIteration] = None, tol: Optional[float] = None,
         trace: Optional[List[dict]] = None) -> torch.Tensor:
    """Stochastic Jacobian-free backprop: `no_grad_iters` solver iterations under no_grad (stopping early below
    `tol`, recording into `trace`), then `grad_iters` plain iterations that autograd records, so memory does not grow
    with `no_grad_iters`.

    The official code runs the first phase without `torch.no_grad` (it builds and discards a graph); the gradients
    are identical, this keeps memory constant.
    """
    if no_grad_iters < 0 or grad_iters < 0:
        raise ValueError(f'S-JFB iteration counts must be >= 0, got ({no_grad_iters}, {grad_iters})')
    if no_grad_iters == 0 and grad_iters == 0:
        return z0  # zero iterations: the identity, so gradients still reach whatever produced z0
    solver = solver or FixedPointIteration()
    # As in the official code, the recorded iterations start from a detached state: gradient reaches earlier layers
    # only through the input injection that `f` closes over.
    z = z0.detach()
    if no_grad_iters > 0:
        with torch.no_grad():
            z = solver.solve(f, z, no_grad_iters, tol=tol, trace=trace)
    for t in range(grad_iters):
        z = f(z, no_grad_iters + t)
    return z


def solve_implicit(fusion: FusionMLP, block: AdaLNSelfAttn, u_BLC: torch.Tensor, cond: torch.Tensor,
                   attn_bias: Optional[torch.Tensor], no_grad_iters: int, grad_iters: int = 0, caches=None,
                   solver: Optional[FixedPointIteration] = None, tol: Optional[float] = None,
                   trace: Optional[List[dict]] = None):
    """The implicit layer on injection u: (hidden state, block evaluations run). Starts from z = u."""
    f = implicit_map(fusion, block, u_BLC, cond, attn_bias, caches)
    calls = [0]

    def counted(z_BLC: torch.Tensor, it: int) -> torch.Tensor:
        calls[0] += 1
        return f(z_BLC, it)

    z_BLC = sjfb(counted, u_BLC, no_grad_iters, grad_iters, solver, tol=tol, trace=trace)
    if caches is not None:
        caches.end_scale()
    return z_BLC, calls[0]
