"""Throughput as a fraction of the machine's own matmul peak: sampling, a training step and Inception, fp32 and bf16.

    python -m bench.speed                        # the bench shapes below (many minutes on a CPU: use an idle machine)
    taskset -c 1 python -m bench.speed --quick --threads 1    # tiny shapes, under a minute: checks that it runs

The peak is a square float32 / bfloat16 matmul timed in the same round robin as the workloads (each timed in turn,
so load from other processes spreads over all of them). Useful FLOPs are counted with torch.utils.flop_counter
(a multiply-add counts 2): sampling on meta-device copies (tokenizer decoding included), the training step as its
forward and backward, Inception per 299x299 image. Weights are random: speed does not depend on them. bf16 runs
under autocast on the device in use (Inception as evaluator.py --inception-precision bf16 runs it). Writes
bench/results/speed_<device>.{md,json} (--quick: speed_<device>_quick.*).
"""
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from bench.efficiency import build_case
from bench.inception_speed import inception_flops_per_image, load_average, machine_info
from bench.measure import (PEAK_MATMUL_SIZE, count_flops, interleaved_timings, matmul_flops, matmul_task,
                           sampling_flops, time_split, write_results)
from evaluation.inception_weights import load_offline_inception
from generation.model_flags import sampling_mode
from models.sampler import autoregressive_infer_cfg, image_seed
from models.schedules import parse_schedule
from training.amp import AmpOptimizer
from training.ar_trainer import token_losses
from training.optim import adamw, param_groups
from utils.cli import ArgumentParser, UserError, main_entry

RESULTS_DIR = Path(__file__).resolve().parent / 'results'
PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16}
VIAR_D8 = dict(depth=8, use_implicit=True, pre_depth=2, post_depth=2)
TINY = dict(depth=2, embed_dim=128, num_heads=2, patch_nums=(1, 2, 3, 4))   # --quick: 64px, 4 scales
SAMPLING_TOP_K, SAMPLING_TOP_P, SAMPLING_CFG = 900, 0.96, 1.5             # the official sampling settings
LR = 1e-4


@dataclass
class Case:
    """One workload shape: a sampling batch, a training batch or an Inception batch."""
    label: str
    shape: Optional[dict] = None        # VARConfig fields (sampling and training)
    schedule: Optional[str] = None      # VIAR iterations per scale
    batch: int = 1


SUITES = {
    'full': {
        'sampling': [Case('VAR d8 w512', dict(depth=8), None, 4),
                     Case('VIAR d8 (2+1+2) linear:10,10', VIAR_D8, 'linear:10,10', 4),
                     Case('VIAR d8 (2+1+2) linear:10,5', VIAR_D8, 'linear:10,5', 4),
                     Case('VAR d16 w1024', dict(depth=16), None, 2)],
        'training': [Case('VAR d8 w512', dict(depth=8), None, 4)],
        'inception': [Case('Inception-v3 (fast backend) 256px', None, None, 8)],
    },
    'quick': {
        'sampling': [Case('VAR d2 w128', TINY, None, 2),
                     Case('VIAR d2 (1+1+0) linear:2,1', dict(TINY, use_implicit=True, pre_depth=1, post_depth=0),
                          'linear:2,1', 2)],
        'training': [Case('VAR d2 w128', TINY, None, 2)],
        'inception': [Case('Inception-v3 (fast backend) 64px', None, None, 1)],
    },
}
INCEPTION_IMAGE_SIZE = {'full': 256, 'quick': 64}


def sampling_workload(case: Case, device: torch.device, dtype: torch.dtype) -> Tuple[Callable[[], object], int]:
    """(one sampling batch, its FLOPs) with the official top-k/top-p/cfg."""
    _, var = build_case(case.label, case.shape, device)
    _, meta_var = build_case(case.label, case.shape, 'meta')
    schedule = parse_schedule(case.schedule) if case.schedule else None
    labels = torch.arange(case.batch, device=device) % var.num_classes
    seeds = [image_seed(0, i) for i in range(case.batch)]

    def run():
        with sampling_mode(device, dtype):
            autoregressive_infer_cfg(var, case.batch, labels, cfg=SAMPLING_CFG, top_k=SAMPLING_TOP_K,
                                     top_p=SAMPLING_TOP_P, schedule=schedule, image_seeds=seeds)
    return run, sampling_flops(meta_var, schedule, batch=case.batch)['total']


def training_workload(case: Case, device: torch.device, precision: str) -> Tuple[Callable[[], object], int]:
    """(one training step: forward, loss, backward, clip, AdamW, as train.py; its forward+backward FLOPs)."""
    _, var = build_case(case.label, case.shape, device)
    var.train().requires_grad_(True)
    amp = AmpOptimizer(var, adamw(param_groups(var)[0], LR, (0.9, 0.95)), precision)
    gen = torch.Generator().manual_seed(0)
    label_B = torch.randint(var.num_classes, (case.batch,), generator=gen).to(device)
    x_BLCv = torch.randn(case.batch, var.L - var.first_l, var.Cvae, generator=gen).to(device)
    gt_BL = torch.randint(var.config.vocab_size, (case.batch, var.L), generator=gen).to(device)

    def step():
        with amp.forward_context(stepping=True):
            loss = token_losses(var(label_B, x_BLCv), gt_BL).mean()
        amp.backward_step(loss, stepping=True)
    return step, count_flops(step)


def inception_workload(case: Case, device: torch.device, precision: str,
                       image_size: int) -> Tuple[Callable[[], object], int]:
    """(features of one batch of uint8 images with the fast backend at `precision`, its FLOPs).

    The network carries its precision (evaluator.py --inception-precision): its own autocast region would switch
    off any autocast around it, so an outer one would time float32 under a bf16 label.
    """
    network = load_offline_inception(device, precision=precision)
    images = np.random.default_rng(0).integers(0, 256, (case.batch, image_size, image_size, 3), dtype=np.uint8)
    return lambda: network.features(images), case.batch * inception_flops_per_image()


def build_tasks(suite: str, device: torch.device, precisions: List[str]) -> Dict[tuple, Tuple[Callable, int, int]]:
    """(workload kind, case label, precision) -> (task, FLOPs, items per call); the peaks as ('peak', ...)."""
    cases = SUITES[suite]
    tasks = {}
    for precision in precisions:
        dtype = PRECISIONS[precision]
        tasks[('peak', f'{PEAK_MATMUL_SIZE}^3 matmul', precision)] = (matmul_task(dtype, device), matmul_flops(), 1)
        for case in cases['sampling']:
            tasks[('sampling', case.label, precision)] = (*sampling_workload(case, device, dtype), case.batch)
        for case in cases['training']:
            tasks[('training step', case.label, precision)] = (*training_workload(case, device, precision), 1)
        for case in cases['inception']:
            task = inception_workload(case, device, precision, INCEPTION_IMAGE_SIZE[suite])
            tasks[('inception', case.label, precision)] = (*task, case.batch)
    return tasks


def measure(tasks: Dict[tuple, Tuple[Callable, int, int]], rounds: int, warmup: int,
            device: torch.device) -> List[dict]:
    """Time every task round robin; one row per task with its best and median throughput and share of the peak."""
    times = interleaved_timings({key: task for key, (task, _, _) in tasks.items()}, rounds, warmup, device)
    peaks = {key[2]: flops / min(times[key]) for key, (_, flops, _) in tasks.items() if key[0] == 'peak'}
    rows = []
    for key, (task, flops, items) in tasks.items():
        kind, label, precision = key
        best, median = min(times[key]), float(np.median(times[key]))
        row = {'workload': kind, 'case': label, 'precision': precision, 'items_per_call': items,
               'items_per_s_best': round(items / best, 3), 'items_per_s_median': round(items / median, 3),
               'gflop_per_call': round(flops / 1e9, 3), 'gflops_best': round(flops / best / 1e9, 1),
               'peak_gflops': round(peaks[precision] / 1e9, 1),
               'fraction_of_peak': round(flops / best / peaks[precision], 3)}
        if kind in PROFILED:
            # Where the time goes: the ops that carry the FLOPs (their own rate against the peak) and the rest.
            split = time_split(task, device)
            row.update(flop_op_time_share=round(split['flop_ops'] / split['total'], 3),
                       flop_ops_fraction_of_peak=round(flops / split['flop_ops'] / peaks[precision], 3),
                       largest_other_ops=[[name, round(sec / split['total'], 3)] for name, sec in split['top_others']])
        rows.append(row)
    return rows


PROFILED = ('sampling', 'training step')


UNITS = {'peak': 'matmuls/s', 'sampling': 'images/s', 'training step': 'steps/s', 'inception': 'images/s'}


def to_markdown(rows: List[dict], meta: dict) -> str:
    m = meta['machine']
    lines = ['# Speed as a fraction of the measured matmul peak', '',
             f'Command: `{meta["command"]}`  ', f'Date (UTC): {meta["date"]}  ',
             f'Machine: {m["cpu"]}, {m["cpu_count"]} CPUs, {meta["threads"]} torch threads, GPU: {m["gpu"] or "none"}, '
             f'torch {m["torch"]}  ',
             f'{meta["rounds"]} timed rounds (round robin over all rows) after {meta["warmup"]} warm-up; best round '
             f'shown, median in the json  ',
             f'Load average (1/5/15 min) before / after: {meta["load_average_before_after"][0]} | '
             f'{meta["load_average_before_after"][1]}', '',
             '| workload | case | precision | batch | throughput (best) | GFLOP per call | GFLOP/s | peak GFLOP/s | '
             'fraction of peak |', '|---|---|---|---:|---:|---:|---:|---:|---:|']
    lines += [f'| {r["workload"]} | {r["case"]} | {r["precision"]} | {r["items_per_call"]} | '
              f'{r["items_per_s_best"]:.3g} {UNITS[r["workload"]]} | {r["gflop_per_call"]:.3g} | '
              f'{r["gflops_best"]:.1f} | '
              f'{r["peak_gflops"]:.1f} | {r["fraction_of_peak"]:.0%} |' for r in rows]
    profiled = [r for r in rows if 'flop_op_time_share' in r]
    if profiled:
        lines += ['', '## Where the time goes', '',
                  'One profiled call per row (torch.profiler, own time of each op): the share of the time spent in the '
                  'ops that carry the counted FLOPs (matrix products, convolutions, fused attention), the rate those '
                  'ops reach against the same peak, and the three largest other ops with their share of the time.', '',
                  '| workload | case | precision | time in FLOP ops | FLOP ops vs peak | largest other ops |',
                  '|---|---|---|---:|---:|---|']
        lines += [f'| {r["workload"]} | {r["case"]} | {r["precision"]} | {r["flop_op_time_share"]:.0%} | '
                  f'{r["flop_ops_fraction_of_peak"]:.0%} | '
                  + ', '.join(f'{name.replace("aten::", "")} {share:.0%}' for name, share in r['largest_other_ops'])
                  + ' |' for r in profiled]
    return '\n'.join(lines) + '\n'


def get_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny shapes, one round: checks that it runs (< 1 min)')
    parser.add_argument('--rounds', type=int, default=None, help='timed rounds (default 3; --quick: 1)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first')
    parser.add_argument('--precisions', nargs='+', choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s default)')
    parser.add_argument('--out_dir', default=str(RESULTS_DIR), help='where speed_<device>.{md,json} go')
    return parser


def main(args):
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise UserError(f'--rounds and --threads must be >= 1 and --warmup >= 0, got {rounds}, {args.threads}, '
                        f'{args.warmup}')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {args.device}: CUDA is not available on this machine')
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    suite = 'quick' if args.quick else 'full'
    load_before = load_average()
    rows = measure(build_tasks(suite, device, args.precisions), rounds, args.warmup, device)
    meta = {'command': ' '.join(['python -m bench.speed'] + [shlex.quote(a) for a in sys.argv[1:]]),
            'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M'), 'machine': machine_info(),
            'threads': torch.get_num_threads(), 'suite': suite, 'rounds': rounds, 'warmup': args.warmup,
            'load_average_before_after': [load_before, load_average()]}
    stem = f'speed_{device.type}' + ('_quick' if args.quick else '')
    write_results(out_dir, stem, meta, rows, to_markdown(rows, meta))
    print(f'wrote {out_dir / stem}.md and .json ({os.cpu_count()} CPUs on this machine)')


if __name__ == '__main__':
    main_entry(main, get_parser())
