"""The one class-conditional next-scale sampler (KV-cached, CFG, top-k/top-p) used by every entry point."""
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .blocks import KVCache
from .schedules import ConstantSchedule, IterSchedule

# more_smooth (Gumbel-softmax token mixing, MaskGIT-style) temperature: max(0.27 * (1 - 0.95 r), 0.005).
SMOOTH_TAU0, SMOOTH_TAU_DECAY, SMOOTH_TAU_MIN = 0.27, 0.95, 0.005


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                             rng: Optional[torch.Generator] = None, num_samples: int = 1) -> torch.Tensor:
    """Filter logits in place by top-k then nucleus (top-p) and draw indices (B, l, num_samples)."""
    B, l, V = logits_BlV.shape
    if top_k > 0:
        kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False  # always keep the most likely token
        logits_BlV.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    replacement = num_samples >= 0
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=abs(num_samples), replacement=replacement,
                             generator=rng).view(B, l, abs(num_samples))


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1,
                            rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gumbel-softmax whose noise comes from `rng` (torch's own version cannot take a generator)."""
    if rng is None:
        return F.gumbel_softmax(logits=logits, tau=tau, hard=hard, dim=dim)
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


class PerIterationKVCaches(dict):
    """The official implicit-block cache: one KV cache per iteration index, created on first use.

    Iteration `it` of a scale attends to the it-th iterate of every earlier scale that ran more than `it`
    iterations, so it matches teacher forcing exactly only for constant schedules.
    """

    def __init__(self, max_len_per_it: Sequence[int], default_len: int):
        super().__init__()
        self.max_len_per_it, self.default_len = list(max_len_per_it), default_len

    def __missing__(self, it: int) -> KVCache:
        n = self.max_len_per_it[it] if it < len(self.max_len_per_it) else self.default_len
        cache = self[it] = KVCache(n)
        return cache

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.values())


class TrunkCaches:
    """All KV caches of one sampling call, preallocated to the tokens each layer will see."""

    def __init__(self, var, caps: List[int], adaptive: bool):
        L = var.L
        if var.use_implicit:
            self.pre = [KVCache(L) for _ in var.pre_blocks]
            self.post = [KVCache(L) for _ in var.post_blocks]
            # Iteration `it` stores the scales that run more than `it` iterations; an adaptive schedule may stop
            # early, so it keeps the worst case.
            sizes = [pn * pn for pn in var.patch_nums]
            max_len = [sum(n for n, c in zip(sizes, caps) if c > it) for it in range(max(caps, default=0))]
            self.implicit = PerIterationKVCaches(max_len if not adaptive else [L] * len(max_len), L)
            self.blocks: List[KVCache] = []
        else:
            self.blocks = [KVCache(L) for _ in var.blocks]

    @property
    def nbytes(self) -> int:
        """Bytes held by every cache of the call."""
        caches = self.blocks if self.blocks else self.pre + self.post
        total = sum(c.nbytes for c in caches)
        return total + (self.implicit.nbytes if not self.blocks else 0)


def forward_scale(var, x_BlC: torch.Tensor, cond_gss: torch.Tensor, caches: TrunkCaches, num_iters: int,
                  tol: Optional[float] = None, trace: Optional[List[dict]] = None) -> torch.Tensor:
    """Run the trunk on one scale's tokens with KV caching (no mask: a scale sees itself and all coarser ones)."""
    if not var.use_implicit:
        for block, cache in zip(var.blocks, caches.blocks):
            x_BlC = block(x_BlC, cond_gss, None, cache)
        return x_BlC
    for block, cache in zip(var.pre_blocks, caches.pre):
        x_BlC = block(x_BlC, cond_gss, None, cache)
    f = var.implicit_map(x_BlC, cond_gss, None, caches.implicit)
    x_BlC = var.solver.solve(f, x_BlC, num_iters, tol=tol, trace=trace)
    for block, cache in zip(var.post_blocks, caches.post):
        x_BlC = block(x_BlC, cond_gss, None, cache)
    return x_BlC


@torch.no_grad()
def autoregressive_infer_cfg(
    var, B: int, label_B: Union[None, int, torch.Tensor], g_seed: Optional[int] = None, cfg: float = 1.5,
    top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, schedule: Optional[IterSchedule] = None,
    trace: Optional[Dict[int, List[dict]]] = None, return_idx: bool = False,
):
    """Generate B images in [0, 1] (B, 3, H, W) with classifier-free guidance ramped linearly over the scales.

    label_B: None draws classes uniformly, an int fills the batch (negative = the null class), a tensor gives one
    class per image. g_seed re-seeds a generator on the model's device per call (official semantics).
    `schedule` sets the implicit iterations per scale (VIAR only; default: implicit_eval_iters at every scale).
    `trace`, when a dict, receives per scale the fixed-point residual/cosine of every iteration.
    With `return_idx` the sampled token pyramid (list of (B, pn*pn)) is returned after the images.
    """
    vae = var.vae
    device = var.lvl_1L.device
    K = len(var.patch_nums)
    rng = None
    if g_seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(g_seed)
    if label_B is None:
        uniform = torch.full((1, var.num_classes), 1.0 / var.num_classes, device=device)
        label_B = torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
    elif isinstance(label_B, int):
        label_B = torch.full((B,), var.num_classes if label_B < 0 else label_B, device=device)
    label_B = label_B.to(device)

    schedule = schedule or ConstantSchedule(var.config.implicit_eval_iters)
    caps = schedule.caps(K) if var.use_implicit else [0] * K
    caches = TrunkCaches(var, caps, adaptive=schedule.tol is not None)

    sos = cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes)), dim=0))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    first_l = var.first_l
    next_token_map = (sos.unsqueeze(1).expand(2 * B, first_l, -1) + var.pos_start.expand(2 * B, first_l, -1)
                      + lvl_pos[:, :first_l])
    cond_gss = var.shared_ada_lin(cond_BD)
    quant = vae.quantize
    f_hat = sos.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    cur_L = 0
    idx_pyramid = []
    for si, pn in enumerate(var.patch_nums):
        ratio = si / var.num_stages_minus_1
        cur_L += pn * pn
        scale_trace = None if trace is None else trace.setdefault(si, [])
        x_BlC = forward_scale(var, next_token_map, cond_gss, caches, caps[si], tol=schedule.tol, trace=scale_trace)
        logits_BlV = var.get_logits(x_BlC, cond_BD)
        t = cfg * ratio
        logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        idx_Bl = sample_with_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, rng=rng, num_samples=1)[:, :, 0]
        idx_pyramid.append(idx_Bl)
        if not more_smooth:
            h_BlC = quant.embedding(idx_Bl)
        else:
            tau = max(SMOOTH_TAU0 * (1 - ratio * SMOOTH_TAU_DECAY), SMOOTH_TAU_MIN)
            soft = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=tau, hard=False, dim=-1, rng=rng)
            h_BlC = soft @ quant.embedding.weight.unsqueeze(0)
        h_BChw = h_BlC.transpose(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_map = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
        if si != var.num_stages_minus_1:
            pn_next = var.patch_nums[si + 1]
            next_BlCv = next_map.view(B, var.Cvae, -1).transpose(1, 2)
            next_token_map = var.word_embed(next_BlCv) + lvl_pos[:, cur_L:cur_L + pn_next * pn_next]
            next_token_map = next_token_map.repeat(2, 1, 1)  # conditional and unconditional halves for CFG
    img_B3HW = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
    return (img_B3HW, idx_pyramid) if return_idx else img_B3HW
