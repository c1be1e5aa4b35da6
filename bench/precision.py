"""bf16 against fp32 on the CPU, on the demo's data and tokenizer: do bf16 samples score the same FID, and does bf16
training reach the same validation loss for the same steps?

    bash scripts/demo.sh && python -m bench.precision      # about 30 minutes on 2 CPU cores after the demo
    python -m bench.precision --quick --demo_dir local_output/demo-quick --data data/fashion_mnist_demo_quick

Sampling: the demo's VIAR checkpoint draws the same images (same seeds, same schedule) once in fp32 and once under
bf16 autocast; both sets are scored against the demo's validation images with bootstrap standard errors, and the
paired images are compared pixel by pixel. Training: the demo's VIAR recipe is trained twice from the same seed on the
same cached tokens, once per precision, and the validation losses after every epoch are compared. Every stage runs
the project's own command-line tools (sampling.py, train.py) in a child process, so the numbers are what a user gets.
Writes bench/results/precision_<device>.{md,json} (--quick: precision_<device>_quick.*).
"""
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from bench.efficiency import machine, machine_line
from evaluation.evaluate import evaluate
from utils.cli import POSITIVE, ArgumentParser, UserError, main_entry
from utils.fileio import read_json_object, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / 'results'
PRECISIONS = ('fp32', 'bf16')
# The demo's sampling and training settings (demo.py FULL plan), repeated here as flags of the child commands.
SAMPLING_FLAGS = ('--cfg', '2.0', '--top_k', '0', '--top_p', '0.0', '--schedule', 'const:3', '--device', 'cpu')
TRAIN_FLAGS = ('--preset', 'viar-demo', '--bs', '32', '--tblr', '0.01', '--workers', '1', '--device', 'cpu',
               '--save_freq', '1', '--log_freq', '20')
QUICK_TRAIN_FLAGS = ('--depth', '2', '--embed_dim', '64', '--num_heads', '2')


def run_tool(argv: List[str], what: str, done_file: Path) -> float:
    """Run one of the project's CLIs in a child process and return its wall time; stops on failure. A stage whose
    `done_file` exists was finished by an earlier run: the tool only checks it, and its first wall time is kept."""
    timings = done_file.parent / 'bench_seconds.json'
    reused = done_file.is_file() and timings.is_file()
    t0 = time.time()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT)
    if done.returncode:
        raise UserError(f'{what} failed (exit code {done.returncode}): {shlex.join(argv)}')
    if reused:
        return float(read_json_object(timings)[done_file.name])
    seconds = time.time() - t0
    recorded = read_json_object(timings) if timings.is_file() else {}
    write_json_atomic(timings, {**recorded, done_file.name: seconds})
    return seconds


def sample_both(demo_dir: Path, out: Path, per_class: int, seed: int) -> Dict[str, dict]:
    """The same images drawn in fp32 and in bf16; {precision: {'npz', 'seconds'}} (finished sets are reused)."""
    ckpt, vae_ckpt = demo_dir / 'viar' / 'ar-ckpt-last.pth', demo_dir / 'tokenizer' / 'vae-ckpt-last.pth'
    for path in (ckpt, vae_ckpt):
        if not path.is_file():
            raise UserError(f'--demo_dir: {path} not found; run `bash scripts/demo.sh` first')
    sets = {}
    for precision in PRECISIONS:
        npz = out / 'samples' / f'{precision}.npz'
        seconds = run_tool(['sampling.py', '--ckpt', str(ckpt), '--vae_ckpt', str(vae_ckpt), *SAMPLING_FLAGS,
                            '--precision', precision, '--per_class', str(per_class), '--batch_size', '50',
                            '--seed', str(seed), '--sample_dir', str(out / 'samples'), '--name', precision],
                           f'sampling in {precision}', npz)
        sets[precision] = {'npz': npz, 'seconds': seconds}
    return sets


def paired_difference(a_npz: Path, b_npz: Path) -> Dict[str, float]:
    """How far apart two sets of the same seeds are: mean absolute pixel difference and the share of equal images."""
    with np.load(a_npz) as fa, np.load(b_npz) as fb:
        a, b = fa['arr_0'].astype(np.int16), fb['arr_0'].astype(np.int16)
    if a.shape != b.shape:
        raise UserError(f'{a_npz} and {b_npz} hold different shapes {a.shape} and {b.shape}')
    per_image = np.abs(a - b).reshape(len(a), -1).mean(1)
    return {'mean_abs_pixel_diff': float(per_image.mean()), 'identical_images': float((per_image == 0).mean())}


def score(reference: Path, sets: Dict[str, dict], resamples: int) -> Dict[str, dict]:
    """FID / sFID / precision / recall with bootstrap standard errors of every set against the reference."""
    return {name: evaluate(reference, s['npz'], device='cpu', fid_method='eigh', resamples=resamples, progress=False)
            for name, s in sets.items()}


def log_records(log_file: Path) -> List[dict]:
    """The json records of train.py's log.txt."""
    return [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith('{')]


def training_images_per_s(records: List[dict]) -> float:
    """Median training throughput over the logged intervals (the first step, which warms up, left out)."""
    speeds = [r['speed/images_per_s'] for r in records if 'speed/images_per_s' in r and r['step'] > 1]
    return float(np.median(speeds)) if speeds else float('nan')


def train_both(data: Path, vae_ckpt: Path, out: Path, epochs: int, seed: int, quick: bool) -> Dict[str, dict]:
    """The demo's VIAR recipe trained once per precision from the same seed on the same cached tokens."""
    runs = {}
    for precision in PRECISIONS:
        run_dir = out / f'train_{precision}'
        seconds = run_tool(['train.py', '--data_path', str(data), '--vae_ckpt', str(vae_ckpt), *TRAIN_FLAGS,
                            *(QUICK_TRAIN_FLAGS if quick else ()), '--ep', str(epochs), '--seed', str(seed),
                            '--precision', precision, '--token_cache', str(out / 'token_cache'),
                            '--out_dir', str(run_dir)], f'training in {precision}', run_dir / 'ar-ckpt-last.pth')
        records = log_records(run_dir / 'log.txt')
        runs[precision] = {'seconds': seconds, 'images_per_s': training_images_per_s(records),
                           'val': [r for r in records if 'val/L_mean' in r]}
        if not runs[precision]['val']:
            raise UserError(f'{run_dir / "log.txt"} has no validation record; is there a val/ folder in the data?')
    return runs


def se_cell(m: dict, key: str, digits: int) -> str:
    return f'{m[key]:.{digits}f} ± {m[key + "_se"]:.{digits}f}'


def to_markdown(meta: dict, metrics: Dict[str, dict], sets: Dict[str, dict], pair: Dict[str, float],
                runs: Dict[str, dict]) -> str:
    n = meta['samples']
    fp32, bf16 = metrics['fp32'], metrics['bf16']
    gap = abs(bf16['fid'] - fp32['fid'])
    joint = float(np.hypot(bf16['fid_se'], fp32['fid_se']))
    lines = ['# bf16 against fp32 on the CPU (demo model)', '',
             f'Command: `{meta["command"]}`  ', f'Date (UTC): {meta["date"]}  ', f'Machine: {meta["machine"]}  ',
             f'Total wall time: {meta["seconds"] / 60:.1f} min', '',
             '## Sampling: the same seeds in both precisions', '',
             f'{n} images ({meta["per_class"]} per class), schedule `const:3`, cfg 2.0, against the demo\'s '
             f'{meta["reference_n"]} validation images; ± is the bootstrap standard error ({meta["resamples"]} '
             'resamples).', '',
             '| precision | FID | sFID | precision (P) | recall (R) | sampling wall time (s) |',
             '|---|---|---|---|---|---|']
    lines += [f'| {p} | {se_cell(m, "fid", 2)} | {se_cell(m, "sfid", 2)} | {se_cell(m, "precision", 3)} | '
              f'{se_cell(m, "recall", 3)} | {sets[p]["seconds"]:.0f} |' for p, m in metrics.items()]
    verdict = 'within' if gap <= 2 * joint else 'outside'
    lines += ['', f'|FID(bf16) - FID(fp32)| = {gap:.2f}, {verdict} two joint standard errors ({2 * joint:.2f}). '
              f'Paired images: mean absolute pixel difference {pair["mean_abs_pixel_diff"]:.2f} / 255, '
              f'{pair["identical_images"]:.1%} of the images bit-identical (the decoder runs under bf16 as well, so '
              'pixel values differ slightly even where the tokens agree; the metrics compare the sets).', '',
              '## Training: the same steps in both precisions', '',
              'The demo\'s VIAR recipe from the same seed on the same cached tokens; validation loss (mean over all '
              'tokens, and the last scale) after every epoch.', '',
              '| epoch | step | fp32 val L_mean | bf16 val L_mean | difference | fp32 val L_tail | bf16 val L_tail |',
              '|---|---|---|---|---|---|---|']
    for a, b in zip(runs['fp32']['val'], runs['bf16']['val']):
        lines.append(f'| {a["epoch"]} | {a["step"]} | {a["val/L_mean"]:.4f} | {b["val/L_mean"]:.4f} | '
                     f'{b["val/L_mean"] - a["val/L_mean"]:+.4f} | {a["val/L_tail"]:.4f} | {b["val/L_tail"]:.4f} |')
    fp32_speed, bf16_speed = runs['fp32']['images_per_s'], runs['bf16']['images_per_s']
    lines += ['', f'Training throughput (median over the logged intervals): fp32 {fp32_speed:.1f} images/s, bf16 '
              f'{bf16_speed:.1f} images/s ({bf16_speed / fp32_speed:.2f}x); wall time of each run, data loading and '
              f'the first run\'s token cache included: fp32 {runs["fp32"]["seconds"]:.0f} s, '
              f'bf16 {runs["bf16"]["seconds"]:.0f} s.']
    return '\n'.join(lines) + '\n'


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--demo_dir', default='local_output/demo', help='a finished demo run (its tokenizer, VIAR, reference)')
    p.add_argument('--data', default='data/fashion_mnist_demo', help='the demo\'s prepared data (train/ and val/)')
    p.add_argument('--out', default='local_output/precision', help='samples and training runs go here')
    p.add_argument('--per_class', type=POSITIVE, default=100, help='samples per class and precision')
    p.add_argument('--epochs', type=POSITIVE, default=2, help='training epochs per precision')
    p.add_argument('--resamples', type=POSITIVE, default=20, help='bootstrap resamples per standard error')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quick', action='store_true', help='tiny model and sample sets: checks that it runs')
    p.add_argument('--out_dir', default=str(RESULTS_DIR), help='where precision_cpu.{md,json} go')
    return p


def main(args):
    started = time.time()
    demo_dir, data, out = Path(args.demo_dir), Path(args.data), Path(args.out)
    reference = demo_dir / 'reference.npz'
    if not reference.is_file():
        raise UserError(f'--demo_dir: {reference} not found; run `bash scripts/demo.sh` first')
    if not (data / 'val').is_dir():
        raise UserError(f'--data: {data / "val"} not found; run `bash scripts/demo.sh` first')
    sets = sample_both(demo_dir, out, args.per_class, args.seed)
    metrics = score(reference, sets, args.resamples)
    pair = paired_difference(sets['fp32']['npz'], sets['bf16']['npz'])
    runs = train_both(data, demo_dir / 'tokenizer' / 'vae-ckpt-last.pth', out, args.epochs, args.seed, args.quick)
    with np.load(reference) as f, np.load(sets['fp32']['npz']) as g:
        reference_n, samples = len(f['arr_0']), len(g['arr_0'])
    meta = {'command': shlex.join(['python', '-m', 'bench.precision', *sys.argv[1:]]),
            'date': time.strftime('%Y-%m-%d %H:%M', time.gmtime()), 'machine': machine_line(machine()),
            'samples': samples, 'per_class': args.per_class, 'reference_n': reference_n,
            'resamples': args.resamples, 'seconds': time.time() - started}
    stem = 'precision_cpu' + ('_quick' if args.quick else '')
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f'{stem}.json', {'meta': meta, 'metrics': metrics, 'paired': pair, 'training': runs,
                                                 'sampling_seconds': {p: s['seconds'] for p, s in sets.items()}})
    markdown = to_markdown(meta, metrics, sets, pair, runs)
    write_text_atomic(out_dir / f'{stem}.md', markdown)
    print(markdown, end='')


if __name__ == '__main__':
    main_entry(main, get_parser())
