"""Reproduction in miniature (VIAR paper Tables 1-3 and Fig. 3, plus a VARiant supernet) on Fashion-MNIST 32x32.

    python -m bench.reproduction                # estimated 97 min on 2 idle CPU cores (measured: 61) -> bench/results/
    python -m bench.reproduction --estimate     # print the plan's estimated wall time by stage, run nothing
    python -m bench.reproduction --quick        # smoke run of every stage (minutes) -> local_output/reproduction-quick

A VAR (var-demo) and a VIAR with 39 % of its parameters (viar-demo, S-JFB over 0-6 detached and 1-4 recorded
iterations) trained on 10,000 training images (batch 32, bf16; the VAR 9 epochs, VIAR 1.44x its steps as in the
paper's Table 5: 13 epochs, about the time of the VAR's 9) from a tokenizer trained for 6 epochs (or --vae_ckpt),
with the demo's recipe (pipelines/demo.py); the VAR fine-tuned one epoch into a VARiant supernet (a 3-layer subnet
after a bridge of 3 scales). Every main row (the floor: 5,000 real training images; their tokenizer reconstructions;
VAR; VIAR at its 5 iterations per scale; the VAR cut to the subnet; the supernet at full depth and at the subnet)
scores 5,000 images against all 10,000 test images with bootstrap standard errors. The
quality-vs-compute curve puts VIAR at const:1 ... const:10, linear, adaptive and budget schedules, the lean KV policy,
the VAR and the VARiant rows on one plot of FID against images/s, each at 500 images. Estimated wall time of the
default plan by stage (`--estimate`):

    prepare Fashion-MNIST                0.4 min
    train the tokenizer                 10.0 min
    train VAR                           17.6 min
    train VIAR                          16.7 min
    train VARiant supernet               1.4 min
    reference activations                6.2 min
    sample the main rows                 6.0 min
    score the main rows                 27.9 min
    sample the curve                     1.0 min
    score the curve                      9.0 min
    speed, FLOPs, convergence trace      1.0 min
    total                               97.1 min

Inception (bf16, ~27 images/s; the rows are comparable with each other, not with fp32 FIDs) takes the largest share:
10,000 reference images once (cached beside the prepared data, so a rerun skips them) and 7 x 5,000 main-row images.
--vae_ckpt saves the tokenizer's training.
Writes reproduction.md / .json, reproduction_curve.png and reproduction_convergence.png into bench/results/ (a
--quick run into its --out); training runs, sample sets and activations stay in --out and are reused by a rerun.
"""
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Tuple

from bench.efficiency import machine, machine_line
from evaluation.quality_report import quality_table, target_lines
from pipelines import demo, reproduction
from pipelines.reproduction import FLOOR, RECONSTRUCTION
from utils.cli import ArgumentParser, UserError, int_range, main_entry, writable_dir
from utils.fileio import write_json_atomic, write_text_atomic
from utils.log import setup_logging
from utils.plots import plot_quality_vs_speed

RESULTS = Path(__file__).resolve().parent / 'results'
CURVE_PNG, TRACE_PNG = 'reproduction_curve.png', 'reproduction_convergence.png'
TARGET_RATIO = 1.10         # VIAR's FID within 10 % of the VAR's
DISTINCT_Z = 2.0            # two FIDs differ when their gap exceeds this many standard errors of the gap
TRACE_ITERATIONS = (1, 2, 3, 5, 10)
PAPER = ('Paper, ImageNet 256 (Tables 1-3): VAR-d30 2010.0M params, FID 2.08, sFID 8.82, 15.16 images/s, 19.24 GB; '
         'VIAR 770.9M (38.4 %), FID 2.16 / sFID 8.07 at 10->10, 21.50 images/s, 11.16 GB; most aggressive schedule '
         'FID 2.43 / sFID 8.28 at 32.08 images/s, 8.53 GB. VARiant paper (Table 2): VAR-d30 FID 1.95; its supernet '
         'with subnets of 16 / 8 / 2 layers after a bridge of 6 of 10 scales: FID 2.05 / 2.12 / 2.97 at 1.7x / 2.6x / '
         '3.5x speed.')


def get_parser() -> ArgumentParser:
    p = demo.benchmark_parser(__doc__.split('\n\n')[0], None, None)
    p.add_argument('--vae_ckpt', default=None, help="reuse this tokenizer (e.g. the demo's local_output/demo/"
                                                    'tokenizer/vae-ckpt-last.pth) instead of training one')
    p.add_argument('--per_class', type=int_range(1), default=None,
                   help=f'images per class of every main row (default {reproduction.FULL.demo.samples_per_class})')
    p.add_argument('--curve_per_class', type=int_range(1), default=None,
                   help=f'images per class of every curve point (default {reproduction.FULL.curve_per_class})')
    p.add_argument('--epochs', type=int_range(1), default=None,
                   help=f"the VAR's training epochs (default {reproduction.FULL.demo.model_epochs}); VIAR trains "
                        f'{reproduction.FULL.viar_step_ratio:g}x as many, rounded')
    p.add_argument('--estimate', action='store_true', help="print the plan's estimated wall time by stage and exit")
    return p


def plan_from_args(args) -> reproduction.ReproPlan:
    """The quick or full plan with the size flags applied, checked."""
    plan = reproduction.QUICK if args.quick else reproduction.FULL
    per_class = args.per_class or plan.demo.samples_per_class
    curve = args.curve_per_class or min(plan.curve_per_class, per_class)
    if per_class > plan.demo.train_per_class:
        raise UserError(f'--per_class {per_class}: the floor row takes that many training images per class, and the '
                        f'plan prepares {plan.demo.train_per_class}')
    if curve > per_class:
        raise UserError(f'--curve_per_class {curve}: the curve reuses the first images of the main rows, so it must '
                        f'not exceed --per_class {per_class}')
    sizes = replace(plan.demo, floor_per_class=per_class, samples_per_class=per_class,
                    model_epochs=args.epochs or plan.demo.model_epochs)
    return replace(plan, demo=sizes, curve_per_class=curve)


def estimate_lines(estimate: Dict[str, float]) -> List[str]:
    lines = [f'    {stage:<34} {seconds / 60:5.1f} min' for stage, seconds in estimate.items()]
    return lines + [f'    {"total":<34} {sum(estimate.values()) / 60:5.1f} min']


def main(args):
    setup_logging(0)
    started = time.time()
    plan = plan_from_args(args)
    estimate = reproduction.estimate(plan, train_tokenizer=args.vae_ckpt is None)
    print('Estimated wall time on 2 idle CPU cores:\n' + '\n'.join(estimate_lines(estimate)), flush=True)
    if args.estimate:
        return
    if args.vae_ckpt is not None and not Path(args.vae_ckpt).is_file():
        raise UserError(f'--vae_ckpt {args.vae_ckpt}: no such file')
    suffix = '-quick' if args.quick else ''
    out = writable_dir(args.out or f'local_output/reproduction{suffix}', '--out')
    data = writable_dir(args.data or f'data/fashion_mnist_repro{suffix.replace("-", "_")}', '--data')
    results_dir = out if args.quick else RESULTS  # a smoke run never overwrites the committed results
    results_dir.mkdir(parents=True, exist_ok=True)
    stages = demo.Stages(total=len(estimate) - (args.vae_ckpt is not None))
    results = reproduction.run(plan, out, data, args.raw_dir, args.seed, args.quick,
                               Path(args.vae_ckpt) if args.vae_ckpt else None, results_dir / TRACE_PNG, stages)
    results['meta'] = {'command': ' '.join(['python -m bench.reproduction', *sys.argv[1:]]), 'machine': machine(),
                       'stage_seconds': stages.times, 'estimate_seconds': estimate,
                       'total_seconds': time.time() - started, 'quick': args.quick}
    write_json_atomic(results_dir / 'reproduction.json', results)
    write_report(results, results_dir)
    print(f'wrote {results_dir / "reproduction.md"}, {results_dir / CURVE_PNG}, {results_dir / TRACE_PNG}')


def write_report(results: dict, results_dir: Path):
    """reproduction.md and the curve's PNG from a results dict (reproduction.run's, with 'meta')."""
    bands = [(f'{name} ({results["curve_metrics"][name]["n"]} images)', results['curve_metrics'][name]['fid'],
              results['curve_metrics'][name].get('fid_se', 0)) for name in (FLOOR, RECONSTRUCTION)]
    plot_quality_vs_speed(curve_points(results), results_dir / CURVE_PNG, curve_title(results), bands)
    write_text_atomic(results_dir / 'reproduction.md', to_markdown(results))


def group_of(row: dict) -> str:
    if row['model'] == 'viar':
        return 'VIAR, lean KV cache' if row['kv_policy'] == 'lean' else 'VIAR schedules'
    return 'VARiant supernet' if row['model'] == 'supernet' else 'VAR'


def curve_points(results: dict) -> List[dict]:
    """One point per row of the main table and of the curve, at the curve's N."""
    points = []
    for row in results['rows'] + results['curve_rows']:
        m, c = results['curve_metrics'][row['label']], results['costs'][row['label']]
        points.append({'label': row['label'].replace('VARiant supernet, ', 'VARiant ').replace('`', ''),
                       'group': group_of(row), 'images_per_s': c['images_per_s'], 'fid': m['fid'],
                       'fid_se': m.get('fid_se')})
    return points


def curve_title(results: dict) -> str:
    n = results['curve_metrics'][FLOOR]['n']
    return f"FID vs sampling speed, {n} images per point against {results['reference_images']} test images"


def ratio_with_error(a: dict, b: dict) -> Tuple[float, float]:
    """a's FID / b's FID and its standard error (first-order propagation of the two bootstrap errors)."""
    r = a['fid'] / b['fid']
    return r, r * math.hypot(a.get('fid_se', 0) / a['fid'], b.get('fid_se', 0) / b['fid'])


def iteration_dependence(results: dict) -> str:
    """Whether VIAR's FID depends on its schedule at the curve's N: the widest gap between two per_iteration points,
    in standard errors of the gap."""
    labels = [r['label'] for r in results['rows'] + results['curve_rows']
              if r['model'] == 'viar' and r['kv_policy'] == 'per_iteration']
    m = results['curve_metrics']
    lo, hi = min(labels, key=lambda k: m[k]['fid']), max(labels, key=lambda k: m[k]['fid'])
    gap = m[hi]['fid'] - m[lo]['fid']
    se = math.hypot(m[hi].get('fid_se', 0), m[lo].get('fid_se', 0))
    spread = (f"VIAR's FID over its {len(labels)} schedules spans {m[lo]['fid']:.2f} ({lo}) to {m[hi]['fid']:.2f} "
              f'({hi}): a gap of {gap:.2f} ± {se:.2f}')
    if gap <= DISTINCT_Z * se:
        return (f'**Quality does not depend on the iteration count within the uncertainty** at this N: {spread}, '
                f'within {DISTINCT_Z:g} standard errors.')
    return f'**The iteration count changes quality measurably**: {spread} ({gap / se:.1f} standard errors).'


def extra_cells(results: dict) -> Dict[str, Dict[str, str]]:
    var_params = results['costs']['VAR']['params']
    cells = {}
    for label, c in results['costs'].items():
        share = '' if c['params'] == var_params else f" ({c['params'] / var_params:.1%} of VAR)"
        cells[label] = {'params': f"{c['params'] / 1e6:.2f}M{share}",
                        'iterations per scale': ','.join(map(str, c['iters_per_scale'] or [])) or '-',
                        'images/s': f"{c['images_per_s']:.1f}", 'KV cache (MiB)': f"{c['kv_cache_MiB']:.2f}",
                        'GFLOPs/image': f"{c['gflops_per_image']:.3f}"}
    return cells


def training_lines(results: dict) -> List[str]:
    plan = results['plan']['demo']
    lines = ['| model | train.py flags | training (min) | val/L_mean after each epoch |', '|---|---|---|---|']
    for model, t in results['training'].items():
        losses = ' → '.join(f'{v:.3f}' for v in t['val_losses']) or '-'
        lines.append(f"| {reproduction.TRAINED[model]} | `{t['flags']}` | {t['seconds'] / 60:.1f} | {losses} |")
    last = {m: t['val_losses'][-2:] for m, t in results['training'].items() if m != 'supernet'}
    changes = ', '.join(f'{reproduction.TRAINED[m]} {v[1] - v[0]:+.3f}' for m, v in last.items() if len(v) == 2)
    var_epochs = plan['model_epochs']
    viar_epochs = results['plan'].get('viar_epochs', var_epochs)
    epochs = (f'{var_epochs} epochs' if viar_epochs == var_epochs else
              f"{var_epochs} epochs for the VAR and {viar_epochs} for VIAR ({viar_epochs / var_epochs:.2f}x the VAR's "
              "steps; the paper's Table 5 trains VIAR 1.44x the steps of VAR-d30)")
    return lines + ['', f"Both models: {plan['train_per_class'] * 10:,} training images, {epochs} "
                        f"at batch {plan['batch_size']}, base lr {plan['model_lr']}, {plan['precision']}. "
                        f'Change of the validation loss over the last epoch: {changes or "-"} (a flattened curve '
                        f"changes by a few thousandths). The validation split is the first {plan['val_per_class']} "
                        'test images per class, so it lies inside the reference set; it selects nothing (every row '
                        "samples each run's last checkpoint)."]


def trace_lines(trace: Dict[str, List[dict]]) -> List[str]:
    """Relative residual and cosine per scale after TRACE_ITERATIONS iterations (the trace's step t is iteration
    t + 1)."""
    head = [f'residual after {i}' for i in TRACE_ITERATIONS] + [f'cosine after {i}' for i in TRACE_ITERATIONS[1:]]
    lines = ['| scale | ' + ' | '.join(head) + ' |', '|' + '---|' * (len(head) + 1)]
    for scale, steps in trace.items():
        by_it = {s['it'] + 1: s for s in steps}
        cells = [f"{by_it[i]['residual']:.2e}" if i in by_it else '-' for i in TRACE_ITERATIONS]
        cells += [f"{by_it[i]['cosine']:.4f}" if i in by_it else '-' for i in TRACE_ITERATIONS[1:]]
        lines.append(f"| {scale.split('_')[-1]} | " + ' | '.join(cells) + ' |')
    return lines


def to_markdown(results: dict) -> str:
    meta, metrics, curve = results['meta'], results['metrics'], results['curve_metrics']
    plan = results['plan']
    viar_label = next(r['label'] for r in results['rows'] if r['model'] == 'viar')
    ratio, ratio_se = ratio_with_error(metrics[viar_label], metrics['VAR'])
    reconstruction = metrics[RECONSTRUCTION]['fid'] / metrics[FLOOR]['fid']
    columns = ('params', 'iterations per scale', 'images/s', 'KV cache (MiB)', 'GFLOPs/image')
    checks = [(f'VIAR FID within {TARGET_RATIO - 1:.0%} of the VAR\'s', f'ratio {ratio:.3f} ± {ratio_se:.3f}',
               ratio <= TARGET_RATIO),
              (f'tokenizer reconstructions FID <= {demo.TARGET_RECONSTRUCTION}x the floor (the decoder bounds every '
               'sample row)', f'{reconstruction:.2f}x', reconstruction <= demo.TARGET_RECONSTRUCTION),
              ('VIAR at most 40 % of the VAR\'s parameters',
               f"{results['costs'][viar_label]['params'] / results['costs']['VAR']['params']:.1%}",
               results['costs'][viar_label]['params'] <= 0.4 * results['costs']['VAR']['params'])]
    # A stage reused from an earlier run (training) counts that run's time, so the total is the whole pipeline's.
    estimated = meta['estimate_seconds']
    measured = {**meta['stage_seconds'], **results.get('first_run_seconds', {})}
    total = sum(measured.values())
    lines = [f"# Reproduction in miniature{' (quick mode: numbers meaningless)' if meta['quick'] else ''}", '',
             f"Command: `{meta['command']}` ({total / 60:.0f} min; estimated "
             f"{sum(estimated.values()) / 60:.0f} min)  ", f"Machine: {machine_line(meta['machine'])}", '',
             f"Fashion-MNIST 32x32. Every row is scored against all {results['reference_images']:,} test images "
             f"(ADM protocol, offline Inception weights in {plan['demo'].get('inception_precision', 'fp32')}); ± is "
             f"the bootstrap standard error over "
             f"{plan['demo']['resamples']} resamples. The floor row scores real training images at the same N: no "
             'model can beat it at this N. Images/s: one batch of '
             f"{plan['speed_batch']} on this CPU in float32 (single batches, about ±20 %); GFLOPs counted per image "
             f"(both CFG halves, decoder included). Sampling: cfg {plan['demo']['cfg']}. Tokenizer: "
             f"`{results['tokenizer']}`.", '',
             '## Main rows (Tables 1 and 3)', '',
             *quality_table(metrics, FLOOR, extra_cells(results), columns), '',
             'Targets:', '', *target_lines(checks), '',
             f"The VARiant rows: the VAR fine-tuned as a supernet (`{results['training']['supernet']['flags']}`), "
             'sampled at full depth and with its subnet; the "cut" row runs the same subnet of the plain VAR without '
             'that training.', '',
             '## Quality against compute', '', f'![quality vs compute]({CURVE_PNG})', '',
             *quality_table(curve, FLOOR, extra_cells(results), columns[1:]), '',
             f'Every point at {curve[FLOOR]["n"]} images (the main rows: the first images of each class of their '
             'sets). ' + iteration_dependence(results), '',
             '## Training', '', *training_lines(results), '',
             '## Convergence of the implicit layer (Fig. 3)', '', f'![convergence]({TRACE_PNG})', '',
             'Relative residual ||z_{t+1} - z_t|| / ||z_t|| and cosine similarity of successive iterates per scale, '
             'one image per class at 10 iterations per scale.', '', *trace_lines(results['trace']), '',
             PAPER, '', '## Wall time by stage', '', '| stage | estimated (min) | measured (min) |', '|---|---|---|']
    lines += [f'| {stage} | {estimated.get(stage, 0) / 60:.1f} | {measured.get(stage, 0) / 60:.1f} |'
              for stage in dict.fromkeys([*estimated, *measured])]
    return '\n'.join(lines + [''])


if __name__ == '__main__':
    main_entry(main, get_parser())
