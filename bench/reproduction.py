"""Reproduction in miniature (VIAR paper Tables 1-3): a VAR and a VIAR with 39 % of its parameters, trained for the
same steps on the demo data, then FID / sFID / precision / recall, images/s, KV-cache bytes and FLOPs per image for
the VAR and for VIAR under several iteration schedules and both KV-cache policies.

    python -m bench.reproduction            # about 30 minutes on 2 CPU cores -> bench/results/reproduction.{md,json}

Data, tokenizer and training settings are the CPU demo's (demo.py FULL plan); outputs in local_output/reproduction.
"""
import json
import sys
import time
from pathlib import Path


import demo
import evaluator
from bench.efficiency import machine
from bench.measure import sampling_flops
from models import num_params
from models.schedules import ListSchedule
from utils.cli import ArgumentParser, main_entry
from utils.fashion_mnist import prepare
from utils.loading import load_models
from utils.log import setup_logging

RESULTS = Path(__file__).resolve().parent / 'results'
# (row label, model, schedule, KV policy); the VAR ignores schedule and policy.
ROWS = [
    ('VAR', 'var-demo', None, 'per_iteration'),
    ('VIAR const:6', 'viar-demo', 'const:6', 'per_iteration'),
    ('VIAR const:3', 'viar-demo', 'const:3', 'per_iteration'),
    ('VIAR linear:3,1', 'viar-demo', 'linear:3,1', 'per_iteration'),
    ('VIAR linear:3,1 lean', 'viar-demo', 'linear:3,1', 'lean'),
    ('VIAR const:1', 'viar-demo', 'const:1', 'per_iteration'),
    ('VIAR adaptive:0.01,6', 'viar-demo', 'adaptive:0.01,6', 'per_iteration'),
]
PAPER = ('Paper, ImageNet 256 (Tables 1-3): VAR-d30 2010.0M params, FID 2.08, sFID 8.82, 15.16 images/s, 19.24 GB; '
         'VIAR 770.9M (38.4 %), FID 2.16 / sFID 8.07 at 10->10, 21.50 images/s, 11.16 GB; most aggressive schedule '
         'FID 2.43 / sFID 8.28 at 32.08 images/s, 8.53 GB.')


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='local_output/reproduction')
    p.add_argument('--data', default='data/fashion_mnist_demo')
    p.add_argument('--raw_dir', default=None, help='Fashion-MNIST idx files (default: the Debian package)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quick', action='store_true', help="the demo's quick plan: a smoke run, numbers meaningless")
    return p


def main(args):
    setup_logging(0)
    started = time.time()
    plan = demo.QUICK if args.quick else demo.FULL
    out = Path(args.out)
    root = prepare(Path(args.data), size=demo.IMAGE_SIZE, raw_dir=args.raw_dir, per_class=plan.train_per_class,
                   val_per_class=plan.val_per_class)
    vae_ckpt = demo.train_tokenizer_stage(root, out / 'tokenizer', plan, args.seed, args.quick)
    ckpts, train_s = {}, {}
    for preset in ('viar-demo', 'var-demo'):
        t0 = time.time()
        ckpts[preset] = demo.train_model_stage(root, out / preset, vae_ckpt, plan, args.seed, args.quick, preset,
                                               plan.extra_train_args, out / 'token_cache')
        train_s[preset] = time.time() - t0
    ref = demo.reference_npz(root, out)
    rows = []
    for label, preset, schedule, policy in ROWS:
        sched = schedule or 'const:1'  # ignored by the explicit VAR
        npz = demo.sample_set(ckpts[preset], vae_ckpt, plan, sched, out / 'samples', args.seed,
                              extra_args=('--kv_policy', policy), name=label.replace(' ', '_').replace(':', '')
                              .replace(',', '-'))
        m = evaluator.evaluate(ref, npz, device='cpu', fid_method='eigh')
        speed = demo.measure_speed(ckpts[preset], vae_ckpt, sched, plan.cfg, n=10 if args.quick else 50,
                                   kv_policy=policy)
        vae, var = load_models(ckpts[preset], vae_ckpt, device='meta')
        # FLOPs of the iterations the timed batch actually ran (an adaptive schedule decides them at run time).
        flops = sampling_flops(var.attach_vae(vae), ListSchedule(tuple(speed['iters_per_scale']))
                               if var.use_implicit else None, kv_policy=policy)
        rows.append({'row': label, 'params': num_params(var), 'schedule': schedule or '-', 'kv_policy': policy,
                     'fid': m['fid'], 'sfid': m['sfid'], 'precision': m['precision'], 'recall': m['recall'],
                     'images_per_s': speed['images_per_s'], 'kv_cache_MiB': speed['kv_cache_MiB'],
                     'iters_per_scale': speed['iters_per_scale'] if var.use_implicit else None,
                     'gflops_per_image': flops['total'] / 1e9})
        print(f"{label:>24}: FID {m['fid']:.2f} sFID {m['sfid']:.2f} P {m['precision']:.3f} R {m['recall']:.3f} "
              f"{speed['images_per_s']:.1f} img/s KV {speed['kv_cache_MiB']:.2f} MiB", flush=True)
    meta = {'command': 'python -m bench.reproduction ' + ' '.join(sys.argv[1:]), 'machine': machine(),
            'plan': demo.asdict(plan), 'train_seconds': train_s, 'total_seconds': time.time() - started}
    results = out if args.quick else RESULTS  # a smoke run does not overwrite the committed results
    results.mkdir(parents=True, exist_ok=True)
    (results / 'reproduction.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1))
    (results / 'reproduction.md').write_text(to_markdown(rows, meta))
    print(f'wrote {results / "reproduction.md"}')


def to_markdown(rows, meta) -> str:
    var_params = next(r['params'] for r in rows if r['row'] == 'VAR')
    viar_params = next(r['params'] for r in rows if r['row'] != 'VAR')
    plan = meta['plan']
    lines = ['# Reproduction in miniature (VIAR paper Tables 1-3 on Fashion-MNIST 32x32)', '',
             f"Command: `{meta['command']}` ({meta['total_seconds'] / 60:.0f} min)  ", f"Machine: {meta['machine']}",
             '', f"Both models: the demo's tokenizer and data ({plan['train_per_class']} training images per class), "
             f"{plan['model_epochs']} epochs at batch {plan['batch_size']} (training took "
             f"{meta['train_seconds']['var-demo'] / 60:.1f} min for the VAR, "
             f"{meta['train_seconds']['viar-demo'] / 60:.1f} min for VIAR). VIAR has {viar_params:,} parameters, "
             f"{viar_params / var_params * 100:.1f} % of the VAR's {var_params:,}. Metrics: "
             f"{plan['samples_per_class'] * 10} samples (cfg {plan['cfg']}) against {plan['val_per_class'] * 10} "
             'validation images, offline Inception weights; images/s for batches of 50 on the CPU; GFLOPs counted '
             'per image (both CFG halves, decoder included).', '',
             '| model / schedule | params | iterations per scale | FID | sFID | precision | recall | images/s | '
             'KV cache (MiB) | GFLOPs/image |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        iters = ','.join(map(str, r['iters_per_scale'])) if r['iters_per_scale'] else '-'
        lines.append(f"| {r['row']} | {r['params'] / 1e6:.2f}M | {iters} | {r['fid']:.2f} | {r['sfid']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['kv_cache_MiB']:.2f} | {r['gflops_per_image']:.3f} |")
    lines += ['', PAPER, '']
    return '\n'.join(lines)


if __name__ == '__main__':
    main_entry(main, get_parser())
