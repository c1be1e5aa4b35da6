"""Measuring helpers shared by the benchmarks: FLOP counts, KV-cache byte formulas, bytes saved for backward, and
the writer of timing results."""
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.sampler import autoregressive_infer_cfg
from models.schedules import IterSchedule
from utils.fileio import write_text_atomic


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (a multiply-add counts 2) of everything `fn` runs, by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


PEAK_MATMUL_SIZE = 2048   # square matmul that reaches the BLAS peak on CPUs and small GPUs alike


def synchronize(device: torch.device):
    """Wait for queued GPU work so that wall-clock timings cover it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_task(dtype: torch.dtype, device='cpu', size: int = PEAK_MATMUL_SIZE) -> Callable[[], object]:
    """A square `size` matmul in `dtype` to time for the machine's peak; its FLOPs are `matmul_flops(size)`."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    return lambda: a @ b


def matmul_flops(size: int = PEAK_MATMUL_SIZE) -> int:
    """FLOPs of one square matmul (a multiply-add counts 2)."""
    return 2 * size ** 3


def interleaved_timings(tasks: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        device: torch.device = torch.device('cpu')) -> Dict[str, List[float]]:
    """Seconds of each task per round, the tasks taken in turn (round robin) so that load from other processes
    spreads over all of them instead of hitting one; `warmup` untimed rounds first."""
    times = {name: [] for name in tasks}
    for r in range(warmup + rounds):
        for name, task in tasks.items():
            synchronize(device)
            start = time.perf_counter()
            task()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


# The ops that carry the counted FLOPs on a CPU or GPU: matrix products, convolutions and fused attention, forward
# and backward.
FLOP_OPS = ('aten::addmm', 'aten::mm', 'aten::bmm', 'aten::baddbmm', 'aten::mkldnn_convolution',
            'aten::convolution', 'aten::cudnn_convolution', 'aten::_scaled_dot_product_flash_attention_for_cpu',
            'aten::_scaled_dot_product_flash_attention', 'aten::_scaled_dot_product_efficient_attention',
            'aten::_scaled_dot_product_flash_attention_for_cpu_backward',
            'aten::_scaled_dot_product_flash_attention_backward',
            'aten::_scaled_dot_product_efficient_attention_backward', 'aten::convolution_backward',
            'aten::_mkldnn_linear', 'aten::mkldnn_linear', 'aten::_linear_pointwise', 'aten::_int_mm')


def time_split(fn: Callable[[], object], device: torch.device = torch.device('cpu')) -> Dict[str, float]:
    """Seconds of one call of `fn` under the profiler: 'flop_ops' (the FLOP_OPS' own time), 'total' (all ops' own
    time) and the three largest other ops, so that a report can say where the time without FLOPs goes."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    own = {e.key: e.self_device_time_total if device.type == 'cuda' else e.self_cpu_time_total
           for e in prof.key_averages()}
    flop_time = sum(t for k, t in own.items() if k in FLOP_OPS)
    others = sorted(((t, k) for k, t in own.items() if k not in FLOP_OPS), reverse=True)[:3]
    return {'flop_ops': flop_time / 1e6, 'total': sum(own.values()) / 1e6,
            'top_others': [[k, t / 1e6] for t, k in others]}


def sampling_flops(var, schedule: Optional[IterSchedule] = None, batch: int = 1, subnet=None,
                   kv_policy: str = 'per_iteration') -> Dict[str, float]:
    """FLOPs to generate `batch` images (both CFG halves), split into transformer and tokenizer decoding.

    Works on meta-device models, so full-size models are counted without memory or time.
    """
    device = var.lvl_1L.device
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    total = count_flops(lambda: autoregressive_infer_cfg(var, batch, labels, cfg=1.5, top_k=900, top_p=0.96,
                                                         schedule=schedule, subnet=subnet, kv_policy=kv_policy))
    pn = var.patch_nums[-1]
    f_hat = torch.zeros(batch, var.Cvae, pn, pn, device=device)
    decode = count_flops(lambda: var.vae.fhat_to_img(f_hat))
    return {'total': total, 'decode': decode, 'transformer': total - decode}


def kv_cache_bytes(var, caps: Sequence[int], policy: str = 'per_iteration', batch: int = 1,
                   dtype: torch.dtype = torch.float32, layers_per_scale: Optional[List[Sequence[int]]] = None) -> int:
    """Closed-form bytes of the KV caches of one sampling call (keys + values, both CFG halves).

    A cache stores 2 (K and V) x 2B sequences x C values per token it holds. Explicit layers hold every scale they
    run; the implicit block holds, per iteration index t, the scales that run more than t iterations (official
    policy) or every scale that runs at least one iteration once (lean policy).
    """
    per_token = 2 * 2 * batch * var.C * torch.tensor([], dtype=dtype).element_size()
    sizes = [pn * pn for pn in var.patch_nums]
    if not var.use_implicit:
        layers = layers_per_scale or [range(len(var.blocks))] * len(sizes)
        tokens = sum(n for n, active in zip(sizes, layers) for _ in active)
        return tokens * per_token
    explicit = (len(var.pre_blocks) + len(var.post_blocks)) * sum(sizes)
    if policy == 'lean':
        implicit = var.L if max(caps) > 0 else 0  # one cache of all L tokens, allocated when first used
    else:
        implicit = sum(sum(n for n, c in zip(sizes, caps) if c > t) for t in range(max(caps)))
    return (explicit + implicit) * per_token


def saved_for_backward_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` builds its graph (each save counted once
    per save, as the graph holds it)."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def write_results(out_dir: Path, stem: str, meta: dict, rows: List[dict], markdown: str):
    """`out_dir/<stem>.json` ({meta, rows}) and `<stem>.md` (`markdown`, also printed)."""
    write_text_atomic(out_dir / f'{stem}.json', json.dumps({'meta': meta, 'rows': rows}, indent=2) + '\n')
    write_text_atomic(out_dir / f'{stem}.md', markdown)
    print(markdown, end='')
