"""The trunk of VAR and VIAR (the layers between the embeddings and the head), written once.

`trunk_stages(config)` describes it as stages: VAR is one stage of explicit blocks (`blocks`); VIAR is pre-blocks,
the implicit layer (fusion MLP + weight-tied block iterated to a fixed point, models/implicit.py) and post-blocks.
Three things read that one description: `VAR.__init__` builds its modules from it, `run_trunk` runs it (teacher
forcing: every scale under the block-causal mask with S-JFB iteration counts; sampling: one scale with KV caches and
the schedule's iteration count), and `TrunkCaches` sizes the KV caches of a sampling call from it.
"""
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .implicit import solve_implicit
from .kv_cache import KV_POLICIES, KVCache, LeanKVCache, PerIterationKVCaches


@dataclass(frozen=True)
class BlockStage:
    """`depth` explicit blocks in the model's ModuleList `name`; nominal layers first_layer.. set drop-path rates."""
    name: str
    depth: int
    first_layer: int


@dataclass(frozen=True)
class ImplicitStage:
    """The implicit layer: the model's fusion MLP `fusion` and weight-tied `block` (nominal layer `layer`)."""
    layer: int
    fusion: str = 'implicit_block_projection'  # the official names: checkpoints hold these keys
    block: str = 'implicit_block'


Stage = Union[BlockStage, ImplicitStage]


def trunk_stages(config) -> Tuple[Stage, ...]:
    """The trunk of a VARConfig: VAR = its blocks; VIAR = pre-blocks, implicit layer, post-blocks.

    Drop-path rates follow the nominal layer each block stands for (checkpoint- and init-compatible with VIAR):
    pre-blocks are layers 0.., the implicit block is the middle layer, post-blocks are the last layers.
    """
    if not config.use_implicit:
        return (BlockStage('blocks', config.depth, 0),)
    return (BlockStage('pre_blocks', config.pre_depth, 0), ImplicitStage(config.depth // 2),
            BlockStage('post_blocks', config.post_depth, config.depth - config.post_depth))


def run_trunk(var, x_BLC: torch.Tensor, cond_gss: torch.Tensor, attn_bias: Optional[torch.Tensor],
              caches: Optional['TrunkCaches'] = None, no_grad_iters: int = 0, grad_iters: int = 0, solver=None,
              tol: Optional[float] = None, trace: Optional[List[dict]] = None,
              layers: Optional[Collection[int]] = None, inactive_tokens: int = 0) -> Tuple[torch.Tensor, int]:
    """Run the trunk of `var`: (hidden states, implicit-block evaluations run).

    Teacher forcing passes all tokens with the block-causal `attn_bias` and the S-JFB counts; sampling passes one
    scale's tokens with no mask, its `caches` and the schedule's count as `no_grad_iters` (with `solver`, early-stop
    `tol` and `trace`). `layers` (VARiant) restricts the explicit blocks, numbered in execution order, to a subset:
    the others run only on the first `inactive_tokens` tokens (the bridge scales in teacher forcing; none in
    sampling). This is exact because earlier tokens never attend to later ones.
    """
    layer, calls = 0, 0
    for stage in var.stages:
        if isinstance(stage, ImplicitStage):
            x_BLC, calls = solve_implicit(getattr(var, stage.fusion), getattr(var, stage.block), x_BLC, cond_gss,
                                          attn_bias, no_grad_iters, grad_iters, None if caches is None else
                                          caches.implicit, solver, tol=tol, trace=trace)
            continue
        blocks = getattr(var, stage.name)
        stage_caches = [None] * len(blocks) if caches is None else caches.explicit[stage.name]
        for block, cache in zip(blocks, stage_caches):
            n = x_BLC.shape[1] if layers is None or layer in layers else inactive_tokens
            if n == x_BLC.shape[1]:
                x_BLC = block(x_BLC, cond_gss, attn_bias, cache)
            elif n > 0:
                bias = None if attn_bias is None else attn_bias[..., :n, :n]
                x_BLC = torch.cat((block(x_BLC[:, :n], cond_gss, bias, cache), x_BLC[:, n:]), dim=1)
            layer += 1
    return x_BLC, calls


class TrunkCaches:
    """All KV caches of one sampling call, laid out after the trunk's stages: one KVCache per explicit block
    (`explicit[stage name]`) and the implicit block's policy (`implicit`: per-iteration caches, or one lean cache)."""

    def __init__(self, stages: Sequence[Stage], patch_nums: Sequence[int], caps: List[int], adaptive: bool,
                 policy: str = 'per_iteration', layers_per_scale: Optional[List[Collection[int]]] = None):
        if policy not in KV_POLICIES:
            raise ValueError(f'unknown KV-cache policy {policy!r}; choose from {KV_POLICIES}')
        sizes = [pn * pn for pn in patch_nums]
        L = sum(sizes)
        self.explicit: Dict[str, List[KVCache]] = {}
        self.implicit = None
        layer = 0
        for stage in stages:
            if isinstance(stage, ImplicitStage):
                self.implicit = self._implicit_caches(sizes, caps, adaptive, policy)
                continue
            # With a VARiant subnet a layer holds only the tokens of the scales that run it.
            lens = [L if layers_per_scale is None else
                    sum(n for n, active in zip(sizes, layers_per_scale) if j in active)
                    for j in range(layer, layer + stage.depth)]
            self.explicit[stage.name] = [KVCache(n) for n in lens]
            layer += stage.depth

    @staticmethod
    def _implicit_caches(sizes: List[int], caps: List[int], adaptive: bool, policy: str):
        L = sum(sizes)
        if policy == 'lean':
            return LeanKVCache(L)
        # Iteration t stores the scales that run more than t iterations; an adaptive schedule may stop a scale early,
        # so it reserves the worst case.
        max_len = [L if adaptive else sum(n for n, c in zip(sizes, caps) if c > t) for t in range(max(caps))]
        return PerIterationKVCaches(max_len, L)

    @property
    def nbytes(self) -> int:
        """Bytes held by every cache of the call."""
        total = sum(c.nbytes for caches in self.explicit.values() for c in caches)
        return total + (self.implicit.nbytes if self.implicit is not None else 0)
