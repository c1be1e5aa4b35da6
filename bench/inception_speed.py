"""Images/s of the evaluator's feature extraction (TF1 resize + Inception pool_3 and mixed_6), CPU and GPU if present.

    taskset -c 1 python -m bench.inception_speed --threads 1 [--batch-sizes 16 64] [--batches 3] [--image-size 256]
        [--precisions fp32 bf16]

Times `InceptionFeatures.features` on uint8 images (ADM's 256px by default), the path every evaluation runs, for
the offline weights run by each backend: the TorchScript module itself (the evaluator's default until the fast
backend), the same weights in the PyTorch architecture ('eager') and its fused channels-last form ('fast', the
default now), in each precision asked for (fp32: ADM's arithmetic; bf16: the autocast the demo uses). A float32
matmul is timed in the same round robin, so every row also reads as a fraction of the machine's measured fp32 peak.
Writes bench/results/<--name>.{md,json} (default inception_speed).
"""
import argparse
import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from bench.measure import PEAK_MATMUL_SIZE, count_flops, interleaved_timings, matmul_flops, matmul_task
from evaluation.inception import INPUT_SIZE, FIDInceptionV3
from evaluation.inception_weights import BACKENDS, DEFAULT_PRECISION, PRECISIONS, load_offline_inception
from utils.cli import ArgumentParser, UserError, main_entry
from utils.fileio import write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent / 'results'
PEAK = 'matmul'


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def machine_info() -> Dict[str, object]:
    """What the numbers depend on: CPU, cores, torch threads, GPU, library versions."""
    info = {'platform': platform.platform(), 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
            'torch_threads': torch.get_num_threads(), 'python': platform.python_version(),
            'torch': torch.__version__, 'numpy': np.__version__, 'gpu': None}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def inception_flops_per_image() -> int:
    """FLOPs of one 299x299 image through the network (counted on the meta device: no memory, no time)."""
    with torch.device('meta'):
        network = FIDInceptionV3(num_classes=0).eval()
        x = torch.empty(1, 3, INPUT_SIZE, INPUT_SIZE)
    return count_flops(lambda: network(x))


def run(devices: List[str], threads: List[int], batch_sizes: List[int], batches: int, warmup: int,
        image_size: int, backends: List[str], precisions: List[str]) -> List[dict]:
    """One row per (device, CPU threads, backend, precision, batch size): median and best images/s of `batches`
    timings, and the best as a fraction of the float32 matmul peak timed in the same round robin."""
    rng = np.random.default_rng(0)
    flops_per_image = inception_flops_per_image()
    rows = []
    for device in devices:
        for num_threads in (threads if device == 'cpu' else [torch.get_num_threads()]):
            torch.set_num_threads(num_threads)
            networks = {(backend, precision): load_offline_inception(device, backend, precision)
                        for backend in backends for precision in precisions}
            tasks = {PEAK: matmul_task(torch.float32, device)}
            for batch_size in batch_sizes:
                images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
                for (backend, precision), network in networks.items():
                    tasks[(backend, precision, batch_size)] = lambda n=network, im=images: n.features(im)
            times = interleaved_timings(tasks, batches, warmup, torch.device(device))
            peak = matmul_flops() / min(times.pop(PEAK))
            print(f'{device:5s} {num_threads:2d} threads float32 matmul peak {peak / 1e9:7.1f} GFLOP/s', flush=True)
            for (backend, precision, batch_size), seconds in times.items():
                speed = [batch_size / t for t in seconds]
                achieved = max(speed) * flops_per_image
                rows.append({'device': device, 'threads': num_threads, 'backend': backend, 'precision': precision,
                             'batch_size': batch_size,
                             'images_per_s_median': round(float(np.median(speed)), 2),
                             'images_per_s_best': round(max(speed), 2),
                             'gflops_best': round(achieved / 1e9, 1), 'peak_gflops': round(peak / 1e9, 1),
                             'fraction_of_peak': round(achieved / peak, 3)})
                print(f'{device:5s} {num_threads:2d} threads {backend:12s} {precision} batch {batch_size:4d}: '
                      f'median {np.median(speed):7.2f}, best {max(speed):7.2f} images/s '
                      f'({achieved / peak:.0%} of the matmul peak)', flush=True)
    return rows


def write_results(rows: List[dict], meta: Dict[str, object], name: str = 'inception_speed'):
    """bench/results/<name>.json and a markdown table with the same numbers (<name>.md)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS_DIR / f'{name}.json', json.dumps({'meta': meta, 'rows': rows}, indent=2) + '\n')
    lines = ['# Inception feature extraction speed', '',
             f'Command: `{meta["command"]}`  ', f'Date (UTC): {meta["date"]}  ',
             f'Machine: {meta["machine"]["cpu"]}, {meta["machine"]["cpu_count"]} CPUs '
             f'({meta["machine"]["torch_threads"]} torch threads by default), '
             f'GPU: {meta["machine"]["gpu"] or "none"}  ',
             f'torch {meta["machine"]["torch"]}, numpy {meta["machine"]["numpy"]}, '
             f'precisions {", ".join(meta["precisions"])} (bf16: autocast), '
             f'input {meta["image_size"]}x{meta["image_size"]} uint8 (resized to 299 inside), '
             f'{meta["batches"]} timed batches per setting (round robin with a {meta["peak_matmul"]}) after '
             f'{meta["warmup"]} warm-up; {meta["gflop_per_image"]:.2f} GFLOP per image  ',
             f'Load average (1/5/15 min) before / after: {meta["load_average_before_after"][0]} | '
             f'{meta["load_average_before_after"][1]}', '',
             '| device | threads | backend | precision | batch size | images/s (median) | images/s (best) | '
             'GFLOP/s (best) | fp32 matmul peak GFLOP/s | fraction of the fp32 peak |',
             '|---|---:|---|---|---:|---:|---:|---:|---:|---:|']
    lines += [f'| {r["device"]} | {r["threads"]} | {r["backend"]} | {r["precision"]} | {r["batch_size"]} | '
              f'{r["images_per_s_median"]:.2f} | {r["images_per_s_best"]:.2f} | {r["gflops_best"]:.1f} | '
              f'{r["peak_gflops"]:.1f} | {r["fraction_of_peak"]:.0%} |' for r in rows]
    write_text_atomic(RESULTS_DIR / f'{name}.md', '\n'.join(lines) + '\n')


def get_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[16, 64])
    parser.add_argument('--batches', type=int, default=3, help='timed batches per setting (median and best)')
    parser.add_argument('--warmup', type=int, default=2,
                        help='untimed batches first (TorchScript profiles its first calls at each input shape)')
    parser.add_argument('--image-size', type=int, default=256, help='side of the uint8 input images')
    parser.add_argument('--devices', nargs='+', default=None, help='default: cpu, plus cuda when available')
    parser.add_argument('--threads', type=int, nargs='+', default=None,
                        help='CPU thread counts to try (default: torch\'s default)')
    parser.add_argument('--backends', nargs='+', choices=BACKENDS, default=list(BACKENDS),
                        help='how the network runs (see evaluator.py --inception-backend)')
    parser.add_argument('--precisions', nargs='+', choices=PRECISIONS, default=[DEFAULT_PRECISION],
                        help='arithmetic of each timed network (see evaluator.py --inception-precision)')
    parser.add_argument('--name', type=results_name, default='inception_speed',
                        help='file name (no suffix) of the results under bench/results/')
    return parser


def results_name(text: str) -> str:
    """A plain file stem: letters, digits, '_' and '-' only (it names files in bench/results/)."""
    if not text or not all(c.isalnum() or c in '_-' for c in text):
        raise argparse.ArgumentTypeError(f'{text!r} is not a plain file name (letters, digits, _ and - only)')
    return text


def load_average() -> str:
    """The 1/5/15-minute load averages: other processes on a small machine change these numbers."""
    return ' / '.join(f'{x:.2f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else 'unknown'


def main(args):
    for flag, values in (('--batch-sizes', args.batch_sizes), ('--batches', [args.batches]),
                         ('--threads', args.threads or [1]), ('--image-size', [args.image_size])):
        if min(values) < 1:
            raise UserError(f'{flag} must be >= 1, got {values}')
    if args.warmup < 0:
        raise UserError(f'--warmup must be >= 0, got {args.warmup}')
    devices = args.devices or (['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu'])
    threads = args.threads or [torch.get_num_threads()]
    load_before = load_average()
    machine = machine_info()    # before set_num_threads: records the default thread count
    rows = run(devices, threads, args.batch_sizes, args.batches, args.warmup, args.image_size, args.backends,
               args.precisions)
    meta = {'command': ' '.join(['python -m bench.inception_speed'] + [shlex.quote(a) for a in sys.argv[1:]]),
            'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M'), 'machine': machine,
            'load_average_before_after': [load_before, load_average()],
            'precisions': args.precisions, 'image_size': args.image_size, 'batches': args.batches,
            'warmup': args.warmup,
            'peak_matmul': f'float32 {PEAK_MATMUL_SIZE}^3 matmul', 'gflop_per_image': inception_flops_per_image() / 1e9}
    write_results(rows, meta, args.name)
    print(f'wrote {RESULTS_DIR / (args.name + ".md")} and .json')


if __name__ == '__main__':
    main_entry(main, get_parser())
