"""Sampling efficiency per model, schedule and KV-cache policy: images/s, latency, peak memory, KV-cache bytes.

    python -m bench.sampling_speed                      # CPU-sized shapes (minutes on 2 cores)
    python -m bench.sampling_speed --suite paper        # VAR-d16..d30 and VIAR-d30 at 256px (use a GPU)

Weights are random (speed and memory do not depend on them); every case runs in a fresh process so that peak
memory (CUDA: max allocated; CPU: peak RSS of the process) is its own. Writes bench/results/<name>.{md,json}.
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

from models import VAR_PRESETS, VQVAE_PRESETS, VARConfig, VQVAEConfig, build_var, build_vqvae, num_params
from models.sampler import autoregressive_infer_cfg, image_seed
from models.schedules import parse_schedule
from models.subnet import SubnetSpec

RESULTS = Path(__file__).resolve().parent / 'results'

# Schedules from the paper's knob: the official 10->10, and increasingly aggressive decreasing ones.
PAPER_SCHEDULES = ['linear:10,10', 'linear:10,5', 'linear:8,3', 'linear:6,2', 'const:2']
# CPU-sized shapes: 10 scales up to 16x16 tokens, width 512, and a small tokenizer.
SMALL_VAE = dict(ch=32, ch_mult=(1, 1, 2, 2, 4))
SMALL_SHAPES = {
    'var-d8': dict(depth=8),
    'viar-d8 (2+1+2)': dict(depth=8, use_implicit=True, pre_depth=2, post_depth=2),
}
# VARiant (d, N) pairs: subnet depth d after a bridge of N full-depth scales (the paper's N = 6).
SUBNETS = [(16, 6), (8, 6), (4, 6), (2, 6)]
SUITES = {
    'small': [(name, kw, sched, pol, None) for name, kw in SMALL_SHAPES.items()
              for sched, pol in ([(None, None)] if not kw.get('use_implicit') else
                                 [(s, p) for s in PAPER_SCHEDULES for p in ('per_iteration', 'lean')])] +
             [('var-d8', SMALL_SHAPES['var-d8'], None, None, (d, N)) for d, N in ((4, 6), (2, 6))],
    'paper': [(name, None, None, None, None) for name in ('var-d16', 'var-d20', 'var-d24', 'var-d30')] +
             [('var-d30', None, None, None, dn) for dn in SUBNETS] +
             [('viar-d30', None, s, p, None) for s in PAPER_SCHEDULES for p in ('per_iteration', 'lean')],
}


def build_case(name: str, shape_kw, device: torch.device):
    if shape_kw is None:
        var_cfg, vae_cfg = VAR_PRESETS[name], VQVAE_PRESETS['vae-ch160v4096z32']
    else:
        var_cfg = VARConfig(**shape_kw)
        vae_cfg = VQVAEConfig(**SMALL_VAE, patch_nums=var_cfg.patch_nums, vocab_size=var_cfg.vocab_size,
                              z_channels=var_cfg.Cvae)
    torch.manual_seed(0)
    vae = build_vqvae(vae_cfg, device).freeze()
    var = build_var(var_cfg, device).eval()
    return vae, var.attach_vae(vae)


def run_case(name: str, shape_kw, schedule: str, policy: str, subnet, batch: int, repeats: int,
             device: torch.device, dtype: torch.dtype) -> dict:
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
    return {'platform': platform.platform(), 'cpu_threads': torch.get_num_threads(), 'gpu': gpu,
            'torch': torch.__version__, 'python': platform.python_version()}


def to_markdown(rows, meta) -> str:
    lines = [f"# Sampling efficiency ({meta['suite']} suite)", '',
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"dtype {meta['dtype']}, batch {meta['batch']}, {meta['repeats']} timed batches after one warm-up, "
             f"cfg 1.5, top-k 900, top-p 0.96, random weights.", '',
             '| model | params | VARiant subnet | schedule | KV policy | iterations per scale | images/s | '
             'latency (s) | KV cache (MiB) | peak memory (MiB) |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        iters = ','.join(map(str, r['iters_per_scale'])) if r['iters_per_scale'] else '-'
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['subnet']} | {r['schedule']} | {r['kv_policy']} | "
                     f"{iters} | "
                     f"{r['images_per_s']:.3f} | {r['latency_s']:.3f} | {r['kv_cache_bytes'] / 2**20:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} |")
    lines += ['', f"Peak memory is the {rows[0]['peak_memory_kind']}." if rows else '']
    return '\n'.join(lines) + '\n'


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--suite', default='small', choices=sorted(SUITES))
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--dtype', default='auto', choices=['auto', 'fp32', 'fp16', 'bf16'])
    p.add_argument('--name', default=None, help='results file stem (default: sampling_speed_<suite>_<device>)')
    p.add_argument('--case', default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()
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
        cmd = [sys.executable, '-m', 'bench.sampling_speed', '--case', json.dumps(case), '--batch', str(args.batch),
               '--repeats', str(args.repeats), '--device', device.type, '--dtype', args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['model']:>18} {r['subnet']:>7} {r['schedule']:>13} {r['kv_policy']:>13}: "
              f"{r['images_per_s']:.3f} img/s, "
              f"KV {r['kv_cache_bytes'] / 2**20:.1f} MiB, peak {r['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
    meta = {'suite': args.suite, 'machine': machine(), 'dtype': str(dtype).replace('torch.', ''),
            'batch': args.batch, 'repeats': args.repeats,
            'command': 'python -m bench.sampling_speed ' + ' '.join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.name or f'sampling_speed_{args.suite}_{device.type}'
    (RESULTS / f'{stem}.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1))
    (RESULTS / f'{stem}.md').write_text(to_markdown(rows, meta))
    print(f'wrote {RESULTS / stem}.md and .json')


if __name__ == '__main__':
    main()
