"""What bf16 Inception changes: FID, sFID, precision and recall of the same image sets with the evaluator's network
in fp32 (ADM's arithmetic) and under bf16 autocast (evaluator.py --inception-precision bf16), and the speed of both.

    python -m bench.inception_precision                       # the demo's sets (run `bash scripts/demo.sh` first)
    python -m bench.inception_precision --reference REF.npz NAME=SET.npz [NAME=SET.npz ...] [--floor NAME]

Every set is scored against the reference in both precisions with bootstrap standard errors, so the shift that bf16
causes reads against the uncertainty of the numbers themselves; the FID-to-floor ratios (the demo's targets) are
compared too. Speed: `InceptionFeatures.features` on one batch of the reference images, both precisions and a
float32 matmul in one round robin. Writes bench/results/inception_precision.{md,json}.
"""
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from bench.efficiency import machine, machine_line
from bench.measure import interleaved_timings, matmul_flops, matmul_task
from evaluation.batches import open_batch
from evaluation.evaluate import evaluate
from evaluation.inception_weights import PRECISIONS, InceptionFeatures, load_inception
from pipelines import demo
from utils.cli import ArgumentParser, UserError, int_range, main_entry
from utils.fileio import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / 'results'
DEMO = Path('local_output/demo')
DEMO_SETS = (('real training images (floor)', DEMO / 'floor.npz'),
             ('tokenizer reconstructions', DEMO / 'reconstructions.npz'))
PEAK = 'matmul'


def parse_set(text: str) -> Tuple[str, Path]:
    name, sep, path = text.partition('=')
    if not sep or not name or not path:
        raise UserError(f'set {text!r}: write NAME=PATH.npz')
    return name, Path(path)


def demo_sets() -> List[Tuple[str, Path]]:
    """The demo's floor, reconstructions and the sample set of every schedule it scores."""
    return list(DEMO_SETS) + [(f'VIAR `{s}`', DEMO / 'samples' / f'{demo.sample_name(s)}.npz')
                              for s in demo.FULL.schedules]


def speed(networks: Dict[str, InceptionFeatures], reference: Path, batch_size: int,
          batches: int) -> Dict[str, float]:
    """Images/s of each precision and the fp32 matmul peak (GFLOP/s), timed in one round robin."""
    images = next(open_batch(reference).images.batches(batch_size))
    tasks = {PEAK: matmul_task(torch.float32, torch.device('cpu'))}
    for precision, network in networks.items():
        tasks[precision] = lambda n=network: n.features(images)
    times = interleaved_timings(tasks, batches, 1, torch.device('cpu'))
    out = {p: len(images) / min(times[p]) for p in PRECISIONS}
    out['peak_gflops'] = matmul_flops() / min(times[PEAK]) / 1e9
    return out


def score(networks: Dict[str, InceptionFeatures], reference: Path, sets: List[Tuple[str, Path]],
          resamples: int) -> Dict[str, Dict[str, dict]]:
    """{precision: {set name: evaluate(...) with standard errors and 'n'}}."""
    results = {}
    for precision, network in networks.items():
        results[precision] = {}
        for name, path in sets:
            r = evaluate(reference, path, network=network, fid_method='eigh', resamples=resamples, progress=False)
            r['n'] = len(open_batch(path).images)
            results[precision][name] = r
            print(f'{precision} {name}: FID {r["fid"]:.2f} ± {r["fid_se"]:.2f}', flush=True)
    return results


def to_markdown(results: Dict[str, Dict[str, dict]], rates: Dict[str, float], meta: dict) -> str:
    fp32, bf16 = results['fp32'], results['bf16']
    floor = meta['floor']
    lines = ['# Inception in bf16 against fp32', '',
             f"Command: `{meta['command']}` ({meta['seconds'] / 60:.0f} min)  ",
             f"Machine: {machine_line(meta['machine'])}", '',
             f"Each set against the reference `{meta['reference']}` ({meta['reference_images']} images), "
             f"Inception run in fp32 and under bf16 autocast; ± is the bootstrap standard error over "
             f"{meta['resamples']} resamples. Shift: bf16 minus fp32, also in units of the fp32 standard error.", '',
             '| set | N | FID fp32 | FID bf16 | shift | shift / SE | FID / floor fp32 | FID / floor bf16 | '
             'sFID fp32 | sFID bf16 | precision fp32 / bf16 | recall fp32 / bf16 |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for name, a in fp32.items():
        b = bf16[name]
        shift = b['fid'] - a['fid']
        lines.append(
            f"| {name} | {a['n']} | {a['fid']:.2f} ± {a['fid_se']:.2f} | {b['fid']:.2f} ± {b['fid_se']:.2f} | "
            f"{shift:+.2f} ({shift / a['fid']:+.1%}) | {shift / a['fid_se']:+.1f} | "
            f"{a['fid'] / fp32[floor]['fid']:.2f}x | {b['fid'] / bf16[floor]['fid']:.2f}x | "
            f"{a['sfid']:.2f} | {b['sfid']:.2f} | {a['precision']:.3f} / {b['precision']:.3f} | "
            f"{a['recall']:.3f} / {b['recall']:.3f} |")
    worst = max(abs(bf16[k]['fid'] / fp32[k]['fid'] - 1) for k in fp32)
    lines += ['', f"Speed on one batch of {meta['speed_batch']} reference images: fp32 {rates['fp32']:.1f} images/s, "
                  f"bf16 {rates['bf16']:.1f} images/s ({rates['bf16'] / rates['fp32']:.2f}x); the fp32 matmul peak "
                  f"measured in the same round robin: {rates['peak_gflops']:.0f} GFLOP/s.", '',
              f'Largest relative FID shift: {worst:.1%}. bf16 numbers are therefore comparable with other bf16 '
              'numbers (the demo and the reproduction score every row, the floor included, in one precision) but '
              'not with fp32 or published FIDs; the evaluator keeps fp32 as its default and caches the two '
              'precisions apart.', '']
    return '\n'.join(lines)


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('sets', nargs='*', metavar='NAME=PATH', help="image sets to score (default: the demo's)")
    p.add_argument('--reference', default=str(DEMO / 'reference.npz'), help='reference image batch (.npz)')
    p.add_argument('--floor', default=DEMO_SETS[0][0], help='the set whose FID the ratios divide by')
    p.add_argument('--resamples', type=int_range(2), default=20, help='bootstrap resamples per number')
    p.add_argument('--speed_batch', type=int_range(1), default=32)
    p.add_argument('--speed_batches', type=int_range(1), default=3)
    return p


def main(args):
    started = time.time()
    sets = [parse_set(s) for s in args.sets] if args.sets else demo_sets()
    for name, path in [('--reference', Path(args.reference))] + sets:
        if not path.is_file():
            raise UserError(f'{name}: {path} does not exist' + (' (run `bash scripts/demo.sh` first)'
                                                                  if not args.sets else ''))
    if args.floor not in dict(sets):
        raise UserError(f'--floor {args.floor!r}: not among the sets ({", ".join(dict(sets))})')
    networks = {p: load_inception(None, 'cpu', precision=p) for p in PRECISIONS}
    results = score(networks, Path(args.reference), sets, args.resamples)
    rates = speed(networks, Path(args.reference), args.speed_batch, args.speed_batches)
    meta = {'command': shlex.join(['python', '-m', 'bench.inception_precision', *sys.argv[1:]]), 'machine': machine(),
            'reference': args.reference, 'reference_images': len(open_batch(args.reference).images),
            'floor': args.floor, 'resamples': args.resamples, 'speed_batch': args.speed_batch,
            'seconds': time.time() - started}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / 'inception_precision.json', {'meta': meta, 'results': results, 'speed': rates})
    write_text_atomic(RESULTS / 'inception_precision.md', to_markdown(results, rates, meta))
    print(f'wrote {RESULTS / "inception_precision.md"}')


if __name__ == '__main__':
    main_entry(main, get_parser())
