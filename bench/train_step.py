"""The demo transformers' training step on a CPU, with each kernel choice of the step: attention path and activation.

    python -m bench.train_step            # viar-demo and var-demo at the demo's shapes (about a minute on 2 cores)
    python -m bench.train_step --quick    # tiny shapes, one round: checks that it runs

A training step here is what train.py runs per batch (bf16 autocast, forward, token losses, backward, clipping,
fused AdamW) on random tokens of the demo's pyramid (scales 1-8, vocabulary 256, 32 latent channels, batch 32);
VIAR runs 1 detached and 2 recorded implicit iterations, about the mean of its S-JFB draws. Variants:

- attention `sdpa-math`: F.scaled_dot_product_attention under the math backend, the path training took before;
  `written-out`: models.blocks.explicit_attention, the path it takes now;
- activation `gelu_tanh` (the official GELU) or `gelu` (the exact one, `train.py --mlp_act gelu`).

Every variant and a square bf16 matmul (the machine's peak) are timed round robin, so load from other processes
spreads over all of them; the table gives each variant's median step time and its speed-up over the first row.
Writes bench/results/train_step_cpu.{md,json} (--quick: train_step_cpu_quick.*).
"""
import shlex
import sys
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import models.blocks
from bench.inception_speed import load_average, machine_info
from bench.measure import interleaved_timings, matmul_flops, matmul_task, write_results
from models import VAR_PRESETS, build_var
from training.amp import AmpOptimizer
from training.ar_trainer import token_losses
from training.optim import adamw, param_groups
from utils.cli import ArgumentParser, UserError, main_entry

RESULTS_DIR = Path(__file__).resolve().parent / 'results'
DEMO_SHAPE = dict(vocab_size=256, Cvae=32, num_classes=10)   # the demo tokenizer's vocabulary and latent width
QUICK_SHAPE = dict(DEMO_SHAPE, depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3))
SJFB_ITERS = (1, 2)
ATTENTION = ('sdpa-math', 'written-out')
ACTIVATIONS = ('gelu_tanh', 'gelu')


def sdpa_math_attention(q, k, v, mask=None, dropout_p=0.0, scale=None):
    """The training path before models.blocks.explicit_attention: SDPA's math backend when differentiated on a CPU."""
    if q.device.type == 'cpu' and q.requires_grad and torch.is_grad_enabled():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


@contextmanager
def attention_path(name: str):
    """models.blocks.attention replaced by the `sdpa-math` path inside the block, or left as it is."""
    current = models.blocks.attention
    if name == 'sdpa-math':
        models.blocks.attention = sdpa_math_attention
    try:
        yield
    finally:
        models.blocks.attention = current


def step_task(preset: str, shape: dict, mlp_act: str, attention: str, batch: int) -> Callable[[], None]:
    """One train.py-like step of `preset` (with `shape` and `mlp_act`) on random tokens, under `attention`."""
    torch.manual_seed(0)
    var = build_var(replace(VAR_PRESETS[preset], **shape, mlp_act=mlp_act)).train()
    amp = AmpOptimizer(var, adamw(param_groups(var)[0], 1e-4, (0.9, 0.95)), 'bf16')
    gen = torch.Generator().manual_seed(0)
    label_B = torch.randint(var.num_classes, (batch,), generator=gen)
    x_BLCv = torch.randn(batch, var.L - var.first_l, var.Cvae, generator=gen)
    gt_BL = torch.randint(var.V, (batch, var.L), generator=gen)
    sjfb = SJFB_ITERS if var.use_implicit else None

    def step():
        with attention_path(attention):
            with amp.forward_context(stepping=True):
                loss = token_losses(var(label_B, x_BLCv, sjfb_iters=sjfb), gt_BL).mean()
            amp.backward_step(loss, stepping=True)
    return step


def measure(presets: List[str], shape: dict, batch: int, rounds: int, warmup: int) -> List[dict]:
    """Median step time of every (preset, attention, activation), timed round robin with a bf16 matmul."""
    variants = [(p, a, act) for p in presets for a in ATTENTION for act in ACTIVATIONS
                if not (a == 'sdpa-math' and act == 'gelu')]
    tasks: Dict[object, Callable] = {v: step_task(v[0], shape, v[2], v[1], batch) for v in variants}
    tasks['peak'] = matmul_task(torch.bfloat16)
    times = interleaved_timings(tasks, rounds, warmup)
    peak = matmul_flops() / min(times['peak']) / 1e9
    rows = []
    for preset, attention, act in variants:
        median = float(np.median(times[(preset, attention, act)]))
        base = float(np.median(times[(preset, ATTENTION[0], ACTIVATIONS[0])]))
        rows.append({'preset': preset, 'attention': attention, 'mlp_act': act, 'batch': batch,
                     'step_ms_median': round(median * 1000, 1),
                     'step_ms_all': [round(t * 1000, 1) for t in times[(preset, attention, act)]],
                     'images_per_s': round(batch / median, 1), 'speedup': round(base / median, 2),
                     'peak_bf16_gflops': round(peak, 1)})
    return rows


def to_markdown(rows: List[dict], meta: dict) -> str:
    m = meta['machine']
    lines = ['# A demo transformer training step on a CPU: attention path and activation', '',
             f'Command: `{meta["command"]}`  ', f'Date (UTC): {meta["date"]}  ',
             f'Machine: {m["cpu"]}, {m["cpu_count"]} CPUs, {meta["threads"]} torch threads, torch {m["torch"]}  ',
             f'{meta["rounds"]} timed rounds (round robin over all rows and a bf16 matmul: peak '
             f'{rows[0]["peak_bf16_gflops"]} GFLOP/s) after {meta["warmup"]} warm-up; the median round shown  ',
             f'Load average (1/5/15 min) before / after: {meta["load_average_before_after"][0]} | '
             f'{meta["load_average_before_after"][1]}', '',
             f'bf16 autocast, batch {rows[0]["batch"]}, demo pyramid (130 tokens, vocabulary 256); VIAR at '
             f'{SJFB_ITERS[0]} detached + {SJFB_ITERS[1]} recorded implicit iterations.', '',
             '| preset | attention | activation | step (ms) | images/s | speed-up |', '|---|---|---|---:|---:|---:|']
    lines += [f'| {r["preset"]} | {r["attention"]} | {r["mlp_act"]} | {r["step_ms_median"]} | {r["images_per_s"]} | '
              f'{r["speedup"]:.2f}x |' for r in rows]
    return '\n'.join(lines) + '\n'


def get_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny shapes, one round: checks that it runs')
    parser.add_argument('--rounds', type=int, default=None, help='timed rounds (default 15; --quick: 1)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument('--out_dir', default=str(RESULTS_DIR), help='where train_step_cpu.{md,json} go')
    return parser


def main(args):
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 15)
    if rounds < 1 or args.warmup < 0:
        raise UserError(f'--rounds must be >= 1 and --warmup >= 0, got {rounds} and {args.warmup}')
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    shape, batch = (QUICK_SHAPE, 4) if args.quick else (DEMO_SHAPE, 32)
    rows = measure(['viar-demo', 'var-demo'], shape, batch, rounds, args.warmup)
    meta = {'command': ' '.join(['python -m bench.train_step'] + [shlex.quote(a) for a in sys.argv[1:]]),
            'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M'), 'machine': machine_info(),
            'threads': torch.get_num_threads(), 'rounds': rounds, 'warmup': args.warmup,
            'load_average_before_after': [load_before, load_average()]}
    stem = 'train_step_cpu' + ('_quick' if args.quick else '')
    write_results(out_dir, stem, meta, rows, to_markdown(rows, meta))
    print(f'wrote {out_dir / stem}.md and .json')


if __name__ == '__main__':
    main_entry(main, get_parser())
