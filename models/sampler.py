"""The one class-conditional next-scale sampler (KV-cached, CFG, top-k/top-p, editing) used by every entry point.

Each scale runs the model's trunk (`models.trunk.run_trunk`, the code teacher forcing runs) on that scale's tokens
with KV caches. `check_sampling_args` is the one validation of the sampling knobs, shared with the CLIs.
"""
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .schedules import BudgetSchedule, ConstantSchedule, IterSchedule, ListSchedule, allocate_budget
from .subnet import SubnetSpec
from .trunk import TrunkCaches, run_trunk

# more_smooth (Gumbel-softmax token mixing, MaskGIT-style) temperature: max(0.27 * (1 - 0.95 r), 0.005).
SMOOTH_TAU0, SMOOTH_TAU_DECAY, SMOOTH_TAU_MIN = 0.27, 0.95, 0.005
# Editing: a scale whose map has at most this many tokens is taken whole from the source image (official rule).
EDIT_FORCE_WHOLE_MAX_TOKENS = 3
MAX_CFG = 1000.0          # far beyond any useful guidance; larger values overflow the logits
MAX_SEED = 2 ** 63 - 1    # seeds are 64-bit signed integers in torch and numpy


def image_seed(seed: int, index: int) -> int:
    """Seed of the image with global index `index` in a run seeded `seed` (independent of batching and ranks)."""
    digest = hashlib.sha256(f'viar:{seed}:{index}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)


class SamplerRNG:
    """Randomness of one batch: one generator for the batch (official `g_seed`), one per image, or the global RNG.

    Per-image generators make every image depend only on its own seed, so a 50k set is the same whatever the batch
    size or the number of processes.
    """

    def __init__(self, device: torch.device, g_seed: Optional[int] = None,
                 image_seeds: Optional[Sequence[int]] = None):
        self.batch_gen, self.image_gens = None, None
        if image_seeds is not None:
            self.image_gens = [torch.Generator(device=device).manual_seed(int(s)) for s in image_seeds]
        elif g_seed is not None:
            self.batch_gen = torch.Generator(device=device).manual_seed(int(g_seed))

    def labels(self, B: int, num_classes: int, device: torch.device) -> torch.Tensor:
        """Uniformly drawn class labels (B,)."""
        if self.image_gens is not None:
            return torch.cat([torch.randint(num_classes, (1,), generator=g, device=device) for g in self.image_gens])
        uniform = torch.full((1, num_classes), 1.0 / num_classes, device=device)
        return torch.multinomial(uniform, num_samples=B, replacement=True, generator=self.batch_gen).reshape(B)

    def multinomial(self, probs_BlV: torch.Tensor) -> torch.Tensor:
        """One draw per token: indices (B, l)."""
        B, l, V = probs_BlV.shape
        if self.image_gens is not None:
            return torch.stack([torch.multinomial(probs_BlV[b], 1, replacement=True, generator=g)[:, 0]
                                for b, g in enumerate(self.image_gens)])
        return torch.multinomial(probs_BlV.reshape(-1, V), 1, replacement=True,
                                 generator=self.batch_gen).view(B, l)

    def exponential_like(self, x_BlV: torch.Tensor) -> torch.Tensor:
        """Exponential(1) noise shaped like x (for Gumbel noise)."""
        if self.image_gens is not None:
            return torch.stack([torch.empty_like(x_BlV[b]).exponential_(generator=g)
                                for b, g in enumerate(self.image_gens)])
        return torch.empty_like(x_BlV).exponential_(generator=self.batch_gen)


def _filter_full_(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The official filter: top-k by threshold (ties at the k-th value survive), then top-p over a full sort."""
    if 0 < top_k < logits_BlV.shape[-1]:  # top_k >= V keeps every token
        kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False  # always keep the most likely token
        logits_BlV.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits_BlV


def top_k_top_p_filter_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf, in place, every logit outside the top-k and then outside the nucleus of mass top_p.

    Bit for bit the official filter, which sorts the whole vocabulary for the nucleus although only the top-k
    survivors can remain; with both filters on, only those k are sorted. The official sorted row is -inf everywhere
    but its last k entries, so the softmax and cumulative sums are taken over that same row and give the same floats.
    Rows whose official result depends on how its sort orders equal logits (ties at the k-th value or across the
    nucleus edge: rare in float32) go through the official code.
    """
    V = logits_BlV.shape[-1]
    # Meta tensors (FLOP counting) have no values to look for ties in.
    if top_p <= 0 or not 0 < top_k < V or not logits_BlV.is_contiguous() or logits_BlV.is_meta:
        return _filter_full_(logits_BlV, top_k, top_p)
    rows_RV = logits_BlV.view(-1, V)
    desc_vals, desc_idx = rows_RV.topk(top_k, largest=True, sorted=True, dim=-1)
    ties_R = (rows_RV >= desc_vals[:, -1:]).sum(dim=-1) > top_k      # ties at the k-th value survive as well
    sorted_vals, sorted_idx = desc_vals.flip(-1), desc_idx.flip(-1)  # ascending, as the official sort
    official_RV = torch.full_like(rows_RV, -torch.inf)
    official_RV[:, V - top_k:] = sorted_vals
    sorted_remove = official_RV.softmax(dim=-1).cumsum_(dim=-1)[:, V - top_k:] <= (1 - top_p)
    sorted_remove[:, -1:] = False  # always keep the most likely token
    edge = sorted_remove[:, :-1] & ~sorted_remove[:, 1:]
    ties_R |= (edge & (sorted_vals[:, :-1] == sorted_vals[:, 1:])).any(dim=-1)   # equal logits across the edge
    tied_rows = rows_RV[ties_R] if ties_R.any() else None
    rows_RV.fill_(-torch.inf).scatter_(-1, sorted_idx, sorted_vals.masked_fill_(sorted_remove, -torch.inf))
    if tied_rows is not None:
        rows_RV[ties_R] = _filter_full_(tied_rows, top_k, top_p)
    return logits_BlV


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                             rng: Optional[torch.Generator] = None, num_samples: int = 1) -> torch.Tensor:
    """The official helper: filter in place and draw indices (B, l, num_samples) with one generator."""
    B, l, V = logits_BlV.shape
    top_k_top_p_filter_(logits_BlV, top_k, top_p)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=abs(num_samples), replacement=num_samples >= 0,
                             generator=rng).view(B, l, abs(num_samples))


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float, rng: SamplerRNG, dim: int = -1) -> torch.Tensor:
    """Soft Gumbel-softmax whose noise comes from `rng`."""
    gumbels = -rng.exponential_like(logits).log()
    return ((logits + gumbels) / tau).softmax(dim)


@dataclass
class EditSpec:
    """Zero-shot editing: where `keep_masks[si]` (B or 1, pn, pn) is True, scale si takes the source tokens."""
    gt_idx_Bl: List[torch.Tensor]
    keep_masks: List[torch.Tensor]


def make_edit_spec(gt_idx_Bl: List[torch.Tensor], keep_mask_BHW: torch.Tensor,
                   patch_nums: Sequence[int]) -> EditSpec:
    """Per-scale keep masks from one mask on the finest token grid (1 = keep the source, 0 = generate).

    Each scale gets the bilinear resize of the mask thresholded at 0.5; the tiniest scales are kept whole.
    """
    if keep_mask_BHW.ndim != 3:
        raise ValueError(f'edit mask must be (B, h, w), got shape {tuple(keep_mask_BHW.shape)}')
    m = keep_mask_BHW.float().unsqueeze(1)
    masks = []
    for pn in patch_nums:
        if pn * pn <= EDIT_FORCE_WHOLE_MAX_TOKENS:
            masks.append(torch.ones(m.shape[0], pn, pn, dtype=torch.bool, device=m.device))
        else:
            masks.append(F.interpolate(m, size=(pn, pn), mode='bilinear', align_corners=False)[:, 0] > 0.5)
    return EditSpec(gt_idx_Bl=list(gt_idx_Bl), keep_masks=masks)


@torch.no_grad()
def zero_shot_edit(var, img_B3HW: torch.Tensor, keep_mask_BHW: torch.Tensor, label_B, **sampling_kwargs):
    """Zero-shot in-/out-painting and class-conditional editing of images in [-1, 1].

    Where `keep_mask_BHW` (on the finest token grid, 1 = keep) is set, every scale takes the image's tokens; the rest
    is generated for `label_B` (a negative int = the null class: plain in-painting). `B` (default: the number of
    images) may exceed 1 for a single source image to draw several edits of it. Other keyword arguments go to
    `autoregressive_infer_cfg`, whose return value this is.
    """
    edit = make_edit_spec(var.vae.img_to_idxBl(img_B3HW), keep_mask_BHW, var.patch_nums)
    B = sampling_kwargs.pop('B', img_B3HW.shape[0])
    return autoregressive_infer_cfg(var, B, label_B, edit=edit, **sampling_kwargs)


# torch.compile of the per-scale trunk step: static shapes give one graph per scale (times batch sizes, schedules and
# VARiant layer sets seen), more than dynamo's default of 8 recompilations per function.
COMPILE_MAX_GRAPHS = 256
_COMPILED_STEPS: Dict[tuple, Callable] = {}


def compiled_trunk_step(backend: str = 'inductor', mode: Optional[str] = None) -> Callable:
    """`run_trunk` under torch.compile with static shapes: one graph per scale, whose KV-cache writes go to
    preallocated buffers at fixed offsets, so that CUDA graphs (mode='reduce-overhead') can capture each scale."""
    key = (backend, mode)
    if key not in _COMPILED_STEPS:
        compiled = torch.compile(run_trunk, backend=backend, mode=mode, dynamic=False)

        def step(*args, **kwargs):
            with torch._dynamo.config.patch(recompile_limit=COMPILE_MAX_GRAPHS):
                return compiled(*args, **kwargs)
        _COMPILED_STEPS[key] = step
    return _COMPILED_STEPS[key]


def check_sampling_args(var=None, cfg: Optional[float] = None, top_k: Optional[int] = None,
                        top_p: Optional[float] = None, schedule: Optional[IterSchedule] = None,
                        image_seeds: Optional[Sequence[int]] = None, B: Optional[int] = None, label_B=None):
    """Raise ValueError (its message starts with the knob's name) for sampling knobs the sampler cannot honour.

    The one check of these knobs: the sampler runs it on every call and the CLIs' flag types and model loading run
    it on theirs. Knobs left None are not checked; `schedule` and `label_B` need the model `var`.
    """
    if cfg is not None and not (math.isfinite(cfg) and 0 <= cfg <= MAX_CFG):
        raise ValueError(f'cfg must be a finite number in [0, {MAX_CFG:g}], got {cfg}')
    if top_k is not None and top_k < 0:
        raise ValueError(f'top_k must be >= 0, got {top_k}')
    if top_p is not None and not (math.isfinite(top_p) and 0 <= top_p <= 1):
        raise ValueError(f'top_p must lie in [0, 1], got {top_p}')
    if image_seeds is not None:
        if B is not None and len(image_seeds) != B:
            raise ValueError(f'image seeds: got {len(image_seeds)} for a batch of {B}')
        wrong = [s for s in image_seeds if not 0 <= s <= MAX_SEED]
        if wrong:
            raise ValueError(f'seeds must lie in [0, {MAX_SEED}], got {wrong[0]}')
    if schedule is not None and var is not None:
        schedule.caps(len(var.patch_nums))  # a ScheduleError (a ValueError) for a wrong length or count
    if isinstance(label_B, torch.Tensor) and label_B.numel() and not label_B.is_meta and (
            label_B.min() < 0 or label_B.max() > var.num_classes):
        raise ValueError(f'class ids must lie in [0, {var.num_classes - 1}] ({var.num_classes} = unconditional), '
                         f'got {label_B.min().item()}..{label_B.max().item()}')


def default_schedule(var) -> IterSchedule:
    """The checkpoint's own schedule: `config.eval_iters` at every scale, the count it was validated at."""
    return ConstantSchedule(var.config.eval_iters)


@torch.no_grad()
def autoregressive_infer_cfg(
    var, B: int, label_B: Union[None, int, torch.Tensor], g_seed: Optional[int] = None, cfg: float = 1.5,
    top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, schedule: Optional[IterSchedule] = None,
    image_seeds: Optional[Sequence[int]] = None, kv_policy: str = 'per_iteration', solver=None,
    edit: Optional[EditSpec] = None, trace: Optional[Dict[int, List[dict]]] = None, return_idx: bool = False,
    stats: Optional[dict] = None, subnet: Optional[SubnetSpec] = None, trunk_step: Optional[Callable] = None,
):
    """Generate B images in [0, 1] (B, 3, H, W) with classifier-free guidance ramped linearly over the scales.

    label_B: None draws classes, an int fills the batch (negative = the null class), a tensor gives one class per
    image. Randomness: `image_seeds` (one seed per image) or `g_seed` (one generator for the batch, the official
    semantics) or neither (global RNG). `schedule` sets the implicit iterations per scale (VIAR only; default
    `default_schedule`: the checkpoint's `eval_iters` everywhere); `kv_policy` and `solver` choose how the implicit
    block is cached and solved. `edit` forces source tokens where its masks say so. `trace`, when a dict, receives
    per scale the fixed-point residual/cosine of every iteration. With `return_idx` the token pyramid (list of
    (B, pn*pn)) follows the images. `stats`, when a dict, receives 'iters' (implicit iterations run per scale),
    'layers' (blocks run per scale), 'kv_bytes' and 'kv_caches'. `subnet` (explicit VAR only) switches later scales
    to a VARiant subnet. `trunk_step` replaces `run_trunk` (e.g. `compiled_trunk_step()`).
    """
    vae = var.vae
    device = var.lvl_1L.device
    K = len(var.patch_nums)
    schedule = schedule or default_schedule(var)
    check_sampling_args(var, cfg=cfg, top_k=top_k, top_p=top_p, schedule=schedule, image_seeds=image_seeds, B=B)
    rng = SamplerRNG(device, g_seed=g_seed, image_seeds=image_seeds)
    if label_B is None:
        label_B = rng.labels(B, var.num_classes, device)
    elif isinstance(label_B, int):
        label_B = torch.full((B,), var.num_classes if label_B < 0 else label_B, device=device)
    label_B = label_B.to(device)
    check_sampling_args(var, label_B=label_B)

    caps = schedule.caps(K) if var.use_implicit else [0] * K
    if subnet is not None and var.use_implicit:
        raise ValueError('VARiant depth switching (subnet) applies to explicit VAR models, not VIAR')
    layers_per_scale = subnet.layers_per_scale(var.depth, K) if subnet is not None else None
    caches = TrunkCaches(var.stages, var.patch_nums, caps, adaptive=schedule.tol is not None, policy=kv_policy,
                         layers_per_scale=layers_per_scale)

    sos = cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes)), dim=0))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    first_l = var.first_l
    next_token_map = (sos.unsqueeze(1).expand(2 * B, first_l, -1) + var.pos_start.expand(2 * B, first_l, -1)
                      + lvl_pos[:, :first_l])
    cond_gss = var.shared_ada_lin(cond_BD)
    quant = vae.quantize
    f_hat = sos.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    cur_L = 0
    idx_pyramid, iters_run = [], []
    for si, pn in enumerate(var.patch_nums):
        ratio = si / var.num_stages_minus_1
        cur_L += pn * pn
        scale_trace = None if trace is None else trace.setdefault(si, [])
        # No mask: a scale sees itself and every coarser one (through the caches).
        x_BlC, n_run = (trunk_step or run_trunk)(var, next_token_map, cond_gss, None, caches, no_grad_iters=caps[si],
                                                 solver=solver, tol=schedule.tol, trace=scale_trace,
                                                 layers=None if layers_per_scale is None else layers_per_scale[si])
        iters_run.append(n_run)
        logits_BlV = var.get_logits(x_BlC, cond_BD)
        t = cfg * ratio
        logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        top_k_top_p_filter_(logits_BlV, top_k, top_p)
        idx_Bl = rng.multinomial(logits_BlV.softmax(dim=-1))
        if not more_smooth:
            h_BlC = quant.embedding(idx_Bl)
        else:
            tau = max(SMOOTH_TAU0 * (1 - ratio * SMOOTH_TAU_DECAY), SMOOTH_TAU_MIN)
            h_BlC = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau, rng) @ quant.embedding.weight.unsqueeze(0)
        if edit is not None:
            # A source of batch 1 is shared by the whole batch (several seeds of one edit).
            keep_Bl = edit.keep_masks[si].reshape(-1, pn * pn).to(device).expand(B, -1)
            gt_Bl = edit.gt_idx_Bl[si].to(device).expand(B, -1)
            idx_Bl = torch.where(keep_Bl, gt_Bl, idx_Bl)
            h_BlC = torch.where(keep_Bl.unsqueeze(-1), quant.embedding(gt_Bl).to(h_BlC.dtype), h_BlC)
        idx_pyramid.append(idx_Bl)
        h_BChw = h_BlC.transpose(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_map = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
        if si != var.num_stages_minus_1:
            pn_next = var.patch_nums[si + 1]
            next_BlCv = next_map.view(B, var.Cvae, -1).transpose(1, 2)
            next_token_map = var.word_embed(next_BlCv) + lvl_pos[:, cur_L:cur_L + pn_next * pn_next]
            next_token_map = next_token_map.repeat(2, 1, 1)  # conditional and unconditional halves for CFG
    img_B3HW = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
    if stats is not None:
        layers_run = [len(ls) for ls in layers_per_scale] if layers_per_scale else \
            [len(var.trunk_blocks)] * K if not var.use_implicit else None
        stats.update(iters=iters_run, layers=layers_run, kv_bytes=caches.nbytes, kv_caches=caches)
    return (img_B3HW, idx_pyramid) if return_idx else img_B3HW


def implicit_iteration_flops(var, si: int) -> float:
    """FLOPs of one implicit iteration at scale si for one image (both CFG halves), attending to all tokens so far.

    Per sequence: fusion MLP 12 l C^2, attention projections 8 l C^2, FFN 4 r l C^2, attention scores and
    mixing 4 l ctx C, with l tokens at the scale and ctx tokens visible.
    """
    C, r = var.C, var.config.mlp_ratio
    l = var.patch_nums[si] ** 2
    ctx = var.begin_ends[si][1]
    return 2 * (l * (20 + 4 * r) * C * C + 4 * l * ctx * C)


@torch.no_grad()
def measure_residual_curves(var, max_iters: int, num_images: int = 4, seed: int = 0, cfg: float = 1.5,
                            top_k: int = 0, top_p: float = 0.0, kv_policy: str = 'per_iteration',
                            solver=None) -> List[List[float]]:
    """Mean relative residual per scale and iteration, from sampling a few random-class images at `max_iters`."""
    trace: Dict[int, List[dict]] = {}
    autoregressive_infer_cfg(var, num_images, None, cfg=cfg, top_k=top_k, top_p=top_p,
                             schedule=ConstantSchedule(max_iters), image_seeds=[image_seed(seed, i) for i in
                                                                                 range(num_images)],
                             kv_policy=kv_policy, solver=solver, trace=trace)
    return [[step['residual'] for step in trace[si]] for si in range(len(var.patch_nums))]


def resolve_schedule(var, schedule: IterSchedule, **calibration) -> IterSchedule:
    """Turn a BudgetSchedule into per-scale counts for this model (other schedules are returned as they are).

    The residual curves come from `measure_residual_curves(var, schedule.cap, **calibration)`; costs are one
    iteration each ('iters') or `implicit_iteration_flops` in GFLOPs ('gflops').
    """
    if not isinstance(schedule, BudgetSchedule):
        return schedule
    if not var.use_implicit:
        raise ValueError('an iteration budget only applies to VIAR (implicit) models')
    curves = measure_residual_curves(var, schedule.cap + 1, **calibration)
    K = len(var.patch_nums)
    if schedule.unit == 'iters':
        costs = [1.0] * K
    else:
        costs = [implicit_iteration_flops(var, si) / 1e9 for si in range(K)]
    allocated = allocate_budget(curves, costs, schedule.budget, max_iters=schedule.cap)
    return ListSchedule(allocated.iters)
