"""Efficiency per model, schedule, KV-cache policy and VARiant subnet (paper Tables 1-3, 5 and VARiant 2/3/8).

    python -m bench.efficiency --flops_only           # FLOPs of the paper's models beside the paper's numbers (fast)
    python -m bench.efficiency                        # CPU-sized shapes: images/s, memory, KV bytes, FLOPs
    python -m bench.efficiency --suite paper          # VAR-d16..d30, VARiant-d30, VIAR-d30 at 256px (use a GPU)
    python -m bench.efficiency --suite paper-cpu --batch 1 --repeats 1   # VAR-d30 vs VIAR-d30 at 256px on a CPU

Weights are random (speed and memory do not depend on them). FLOPs are counted with torch.utils.flop_counter on
meta-device copies (no memory, no time). Every timed case runs in a fresh process so its peak memory (CUDA: max
allocated; CPU: peak RSS of the process) is its own. Results: bench/results/<name>.{md,json}.
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.inception_speed import cpu_model
from bench.measure import sampling_flops
from models import VAR_PRESETS, VQVAE_PRESETS, VARConfig, VQVAEConfig, build_var, build_vqvae, num_params
from models.sampler import autoregressive_infer_cfg, image_seed
from models.schedules import parse_schedule
from models.subnet import SubnetSpec
from utils.fileio import write_text_atomic

RESULTS = Path(__file__).resolve().parent / 'results'
ROOT = Path(__file__).resolve().parents[1]

# Schedules from the paper's knob: the official 10->10, and increasingly aggressive decreasing ones.
PAPER_SCHEDULES = ['linear:10,10', 'linear:10,5', 'linear:8,3', 'linear:6,2', 'const:2']
# VARiant (d, N) pairs: subnet depth d after a bridge of N full-depth scales (the paper's N = 6).
SUBNETS = [(16, 6), (8, 6), (4, 6), (2, 6)]
# CPU-sized shapes: 10 scales up to 16x16 tokens, width 512, and a small tokenizer.
SMALL_VAE = dict(ch=32, ch_mult=(1, 1, 2, 2, 4))
SMALL_SHAPES = {
    'var-d8': dict(depth=8),
    'viar-d8 (2+1+2)': dict(depth=8, use_implicit=True, pre_depth=2, post_depth=2),
}
SUITES = {
    'small': [('var-d8', SMALL_SHAPES['var-d8'], None, None, None)] +
             [('var-d8', SMALL_SHAPES['var-d8'], None, None, dn) for dn in ((4, 6), (2, 6))] +
             [('viar-d8 (2+1+2)', SMALL_SHAPES['viar-d8 (2+1+2)'], s, p, None)
              for s in PAPER_SCHEDULES for p in ('per_iteration', 'lean')],
    'paper': [(name, None, None, None, None) for name in ('var-d16', 'var-d20', 'var-d24', 'var-d30')] +
             [('var-d30', None, None, None, dn) for dn in SUBNETS] +
             [('viar-d30', None, s, p, None) for s in PAPER_SCHEDULES for p in ('per_iteration', 'lean')],
    # The paper's headline comparison at full size, small enough for a CPU at batch 1 (slow, but it runs).
    'paper-cpu': [('var-d30', None, None, None, None), ('var-d30', None, None, None, (8, 6)),
                  ('viar-d30', None, 'linear:10,10', 'per_iteration', None),
                  ('viar-d30', None, 'const:2', 'per_iteration', None), ('viar-d30', None, 'const:2', 'lean', None)],
}
# The VIAR paper's Table 5 (TFLOPs per image); see `paper_tflops` for how they relate to counted FLOPs.
PAPER_TFLOPS = {'var-d30': '1.88', 'viar-d30': '0.84 - 1.46'}


def configs(name: str, shape_kw):
    if shape_kw is None:
        return VAR_PRESETS[name], VQVAE_PRESETS['vae-ch160v4096z32']
    var_cfg = VARConfig(**shape_kw)
    return var_cfg, VQVAEConfig(**SMALL_VAE, patch_nums=var_cfg.patch_nums, vocab_size=var_cfg.vocab_size,
                                z_channels=var_cfg.Cvae)


def build_case(name: str, shape_kw, device):
    var_cfg, vae_cfg = configs(name, shape_kw)
    torch.manual_seed(0)
    vae = build_vqvae(vae_cfg, device).freeze()
    var = build_var(var_cfg, device).eval()
    return vae, var.attach_vae(vae)


def count_case_flops(name: str, shape_kw, schedule, subnet, policy) -> dict:
    """FLOPs per image of one case, counted on the meta device."""
    _, var = build_case(name, shape_kw, 'meta')
    flops = sampling_flops(var, parse_schedule(schedule) if schedule else None,
                           subnet=SubnetSpec(*subnet) if subnet else None, kv_policy=policy or 'per_iteration')
    return {'flops_total': flops['total'], 'flops_transformer': flops['transformer'], 'flops_decode': flops['decode'],
            'paper_tflops': paper_tflops(flops)}


def paper_tflops(flops: dict) -> float:
    """The unit of the VIAR paper's Table 5: multiply-accumulates of the transformer for both CFG halves (= counted
    transformer FLOPs / 2), which reproduces its 1.88 for VAR-d30; see bench/results/flops_paper.md."""
    return flops['transformer'] / 2 / 1e12


def run_case(name: str, shape_kw, schedule, policy, subnet, batch: int, repeats: int, device: torch.device,
             dtype: torch.dtype) -> dict:
    """Time `repeats` batches after one warm-up batch; returns the measurements."""
    vae, var = build_case(name, shape_kw, device)
    sched = parse_schedule(schedule) if schedule else None
    spec = SubnetSpec(*subnet) if subnet else None
    labels = torch.arange(batch, device=device) % var.num_classes
    stats = {}

    def one(r: int):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            autoregressive_infer_cfg(var, batch, labels, cfg=1.5, top_k=900, top_p=0.96, schedule=sched,
                                     image_seeds=[image_seed(r, i) for i in range(batch)],
                                     kv_policy=policy or 'per_iteration', subnet=spec, stats=stats)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    one(0)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for r in range(repeats):
        one(r + 1)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {'model': name, 'params': num_params(var), 'schedule': schedule or '-', 'kv_policy': policy or '-',
            'subnet': f'd{subnet[0]} N{subnet[1]}' if subnet else '-', 'layers_per_scale': stats['layers'],
            'iters_per_scale': stats['iters'] if var.use_implicit else None, 'batch': batch,
            'images_per_s': batch * repeats / seconds, 'latency_s': seconds / repeats,
            'kv_cache_bytes': stats['kv_bytes'], 'peak_memory_bytes': peak,
            'peak_memory_kind': 'cuda max allocated' if device.type == 'cuda' else 'process peak RSS'}


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {'platform': platform.platform(), 'cpu': cpu_model(), 'cpu_threads': torch.get_num_threads(), 'gpu': gpu,
            'torch': torch.__version__, 'python': platform.python_version()}


def machine_line(m: dict) -> str:
    """A machine() record as one readable line for the markdown reports."""
    return (f"{m.get('gpu') or 'no GPU'}, {m.get('cpu', 'CPU')} ({m['cpu_threads']} torch threads), "
            f"torch {m['torch']}, Python {m['python']}, {m['platform']}")


def to_markdown(rows, meta) -> str:
    lines = [f"# Sampling efficiency ({meta['suite']} suite)", '',
             f"Command: `{meta['command']}`  ", f"Machine: {machine_line(meta['machine'])}  ",
             f"dtype {meta['dtype']}, batch {meta['batch']}, {meta['repeats']} timed batches after one warm-up, "
             f"cfg 1.5, top-k 900, top-p 0.96, random weights. GFLOPs per image are counted (a multiply-add = 2), "
             f"transformer for both CFG halves plus tokenizer decoding.", '',
             '| model | params | VARiant subnet | schedule | KV policy | iterations per scale | GFLOPs/image | '
             'images/s | latency (s) | KV cache (MiB) | peak memory (MiB) |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        iters = ','.join(map(str, r['iters_per_scale'])) if r['iters_per_scale'] else '-'
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['subnet']} | {r['schedule']} | "
                     f"{r['kv_policy']} | {iters} | {r.get('flops_total', 0) / 1e9:.1f} | {r['images_per_s']:.3f} | "
                     f"{r['latency_s']:.3f} | {r['kv_cache_bytes'] / 2**20:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} |")
    lines += ['', f"Peak memory is the {rows[0]['peak_memory_kind']}." if rows else '']
    return '\n'.join(lines) + '\n'


def flops_report() -> str:
    """FLOPs of the paper's models and schedules, beside the VIAR paper's Table 5."""
    cases = [(n, None, None, None) for n in ('var-d16', 'var-d20', 'var-d24', 'var-d30')] + \
            [('var-d30', None, None, dn) for dn in SUBNETS] + \
            [('viar-d30', None, s, None) for s in PAPER_SCHEDULES + ['linear:10,8', 'linear:10,7']]
    rows = []
    for name, shape_kw, sched, subnet in cases:
        f = count_case_flops(name, shape_kw, sched, subnet, None)
        _, var = build_case(name, None, 'meta')
        rows.append({'model': name, 'params': num_params(var), 'schedule': sched or '-',
                     'subnet': f'd{subnet[0]} N{subnet[1]}' if subnet else '-', **f,
                     'paper': PAPER_TFLOPS.get(name, '-') if subnet is None else '-'})
        print(f"{name:>9} {rows[-1]['subnet']:>7} {rows[-1]['schedule']:>13}: {f['paper_tflops']:.3f} TFLOPs "
              f"(paper unit), {f['flops_total'] / 1e12:.3f} TFLOP counted", flush=True)
    lines = ['# FLOPs per 256x256 image at the paper\'s settings', '',
             'Command: `python -m bench.efficiency --flops_only` (counted with torch.utils.flop_counter on '
             'meta-device models; batch 1, cfg 1.5 so both CFG halves run, top-k 900, top-p 0.96).', '',
             '| model | params | VARiant subnet | schedule | counted total TFLOP (FLOPs, incl. VAE decode) | '
             'transformer TFLOP | VAE decode TFLOP | paper unit (transformer MACs) | paper (Table 5) |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['subnet']} | {r['schedule']} | "
                     f"{r['flops_total'] / 1e12:.3f} | {r['flops_transformer'] / 1e12:.3f} | "
                     f"{r['flops_decode'] / 1e12:.3f} | {r['paper_tflops']:.3f} | {r['paper']} |")
    var30 = next(r for r in rows if r['model'] == 'var-d30' and r['subnet'] == '-')['paper_tflops']
    viar = {r['schedule']: r['paper_tflops'] for r in rows if r['model'] == 'viar-d30'}
    near = lambda target: min(viar, key=lambda k: abs(viar[k] - target))  # noqa: E731
    lines += ['', 'How the numbers relate: torch counts a multiply-add as 2 FLOPs. The paper\'s "TFLOPs" match the '
              'number of multiply-accumulates (counted FLOPs / 2) of the transformer for the conditional and '
              f'unconditional halves together, without the VQVAE decoder: VAR-d30 gives {var30:.3f} here vs 1.88 '
              f'in the paper ({abs(var30 / 1.88 - 1) * 100:.1f} % apart). In that unit VIAR\'s 0.84 is closest to '
              f'{near(0.84)} ({viar[near(0.84)]:.3f}) and 1.46 to {near(1.46)} ({viar[near(1.46)]:.3f}); the paper '
              'does not name the two schedules, and the official 10->10 schedule costs '
              f"{viar['linear:10,10']:.3f}, above its upper bound."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / 'flops_paper.json', json.dumps({'machine': machine(), 'rows': rows}, indent=1))
    text = '\n'.join(lines) + '\n'
    write_text_atomic(RESULTS / 'flops_paper.md', text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--suite', default='small', choices=sorted(SUITES))
    p.add_argument('--flops_only', action='store_true', help="only count FLOPs of the paper's configurations")
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--dtype', default='auto', choices=['auto', 'fp32', 'fp16', 'bf16'])
    p.add_argument('--name', default=None, help='results file stem (default: efficiency_<suite>_<device>)')
    p.add_argument('--case', default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()
    if args.flops_only:
        print(flops_report())
        return
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          ('cpu' if args.device == 'auto' else args.device))
    dtype = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16,
             'auto': torch.float16 if device.type == 'cuda' else torch.float32}[args.dtype]
    if args.case is not None:
        name, shape_kw, sched, pol, subnet = json.loads(args.case)
        print(json.dumps(run_case(name, shape_kw, sched, pol, subnet, args.batch, args.repeats, device, dtype)))
        return
    rows = []
    for case in SUITES[args.suite]:
        cmd = [sys.executable, '-m', 'bench.efficiency', '--case', json.dumps(case), '--batch', str(args.batch),
               '--repeats', str(args.repeats), '--device', device.type, '--dtype', args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        name, shape_kw, sched, pol, subnet = case
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]),
                     **count_case_flops(name, shape_kw, sched, subnet, pol)})
        r = rows[-1]
        print(f"{r['model']:>18} {r['subnet']:>7} {r['schedule']:>13} {r['kv_policy']:>13}: "
              f"{r['images_per_s']:.3f} img/s, {r['flops_total'] / 1e9:.1f} GFLOPs, "
              f"KV {r['kv_cache_bytes'] / 2**20:.1f} MiB, peak {r['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
    meta = {'suite': args.suite, 'machine': machine(), 'dtype': str(dtype).replace('torch.', ''),
            'batch': args.batch, 'repeats': args.repeats,
            'command': 'python -m bench.efficiency ' + ' '.join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.name or f'efficiency_{args.suite}_{device.type}'
    write_text_atomic(RESULTS / f'{stem}.json', json.dumps({'meta': meta, 'rows': rows}, indent=1))
    write_text_atomic(RESULTS / f'{stem}.md', to_markdown(rows, meta))
    print(f'wrote {RESULTS / stem}.md and .json')


if __name__ == '__main__':
    main()
