"""Reproduction in miniature (VIAR paper Tables 1-3): a VAR and a VIAR with 39 % of its parameters, trained for the
same steps on the demo data, then FID / sFID / precision / recall, images/s, KV-cache bytes and FLOPs per image for
the VAR and for VIAR under several iteration schedules and both KV-cache policies. The VAR is then fine-tuned into a
VARiant supernet (progressive schedule, Alg. 1 of the VARiant paper) and sampled at full depth and with a 3-layer
subnet after a bridge of 3 scales, beside the plain VAR cut to the same subnet without that training.

    python -m bench.reproduction            # about 30 minutes on 2 CPU cores -> bench/results/reproduction.{md,json}

Data, tokenizer and training settings are the CPU demo's (demo.py FULL plan); outputs in local_output/reproduction.
"""
import json
import sys
import time
from pathlib import Path
from typing import Tuple


from bench.efficiency import machine, machine_line
from bench.measure import sampling_flops
from evaluation.evaluate import evaluate
from models import num_params
from models.schedules import ListSchedule
from models.subnet import SubnetSpec
from pipelines import demo
from utils.cli import ArgumentParser, main_entry
from utils.fashion_mnist import prepare
from utils.fileio import write_text_atomic
from utils.log import setup_logging
from utils.model_checkpoints import load_models

RESULTS = Path(__file__).resolve().parent / 'results'
SUPERNET = 'varient-supernet'
# VARiant: a 3-layer equidistant subnet of the 9-layer VAR after a bridge of 3 of the 6 scales (the paper: d8 or d16
# of 30 layers after 6 of 10 scales), fine-tuned for one epoch at a constant lr through all three phases.
SUBNET = SubnetSpec(depth=3, bridge=3)
QUICK_SUBNET = SubnetSpec(depth=2, bridge=3)  # quick mode: 2 of the 3 layers of QUICK_VAR_ARGS
SUPERNET_ARGS = ('--ep', '1', '--phase1_epochs', '0.2', '--phase2_epochs', '0.5', '--sche', 'const', '--tlr', '2e-4')
QUICK_VAR_ARGS = ('--depth', '3', '--embed_dim', '64', '--num_heads', '2')  # quick mode: deep enough for a subnet
# (row label, model, schedule, KV policy, subnet); the VARs ignore schedule and policy.
ROWS = [
    ('VAR', 'var-demo', None, 'per_iteration', None),
    ('VIAR const:6', 'viar-demo', 'const:6', 'per_iteration', None),
    ('VIAR const:3', 'viar-demo', 'const:3', 'per_iteration', None),
    ('VIAR linear:3,1', 'viar-demo', 'linear:3,1', 'per_iteration', None),
    ('VIAR linear:3,1 lean', 'viar-demo', 'linear:3,1', 'lean', None),
    ('VIAR const:1', 'viar-demo', 'const:1', 'per_iteration', None),
    ('VIAR adaptive:0.01,6', 'viar-demo', 'adaptive:0.01,6', 'per_iteration', None),
    ('VAR cut to subnet d{d} N{n}', 'var-demo', None, 'per_iteration', SUBNET),
    ('VARiant supernet, full depth', SUPERNET, None, 'per_iteration', None),
    ('VARiant supernet, subnet d{d} N{n}', SUPERNET, None, 'per_iteration', SUBNET),
]
PAPER = ('Paper, ImageNet 256 (Tables 1-3): VAR-d30 2010.0M params, FID 2.08, sFID 8.82, 15.16 images/s, 19.24 GB; '
         'VIAR 770.9M (38.4 %), FID 2.16 / sFID 8.07 at 10->10, 21.50 images/s, 11.16 GB; most aggressive schedule '
         'FID 2.43 / sFID 8.28 at 32.08 images/s, 8.53 GB.')


VARIANT_PAPER = ('VARiant paper (ImageNet 256, Table 2): VAR-d30 FID 1.95; its supernet with subnets of 16 / 8 / 2 '
                 'layers after a bridge of 6 of 10 scales: FID 2.05 / 2.12 / 2.97 at 1.7x / 2.6x / 3.5x speed, '
                 '40-80 % less memory.')


def get_parser() -> ArgumentParser:
    return demo_data_parser(__doc__.split('\n\n')[0], 'local_output/reproduction')


def demo_data_parser(description: str, out: str) -> ArgumentParser:
    """The flags of the benchmarks that train on the demo's data with the demo's plan."""
    p = ArgumentParser(description=description)
    p.add_argument('--out', default=out)
    p.add_argument('--data', default='data/fashion_mnist_demo')
    p.add_argument('--raw_dir', default=None, help='Fashion-MNIST idx files (default: the Debian package)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quick', action='store_true', help="the demo's quick plan: a smoke run, numbers meaningless")
    return p


def demo_setup(args) -> Tuple[demo.DemoPlan, Path, Path]:
    """(plan, output folder, prepared data root) of a benchmark run on the demo's data."""
    setup_logging(0)
    plan = demo.QUICK if args.quick else demo.FULL
    root = prepare(Path(args.data), size=demo.IMAGE_SIZE, raw_dir=args.raw_dir, per_class=plan.train_per_class,
                   val_per_class=plan.val_per_class)
    return plan, Path(args.out), root


def main(args):
    started = time.time()
    plan, out, root = demo_setup(args)
    vae_ckpt = demo.train_tokenizer_stage(root, out / 'tokenizer', plan, args.seed, args.quick)
    ckpts, train_s = {}, {}
    for preset in ('viar-demo', 'var-demo'):
        t0 = time.time()
        extra = QUICK_VAR_ARGS if args.quick and preset == 'var-demo' else plan.extra_train_args
        ckpts[preset] = demo.train_model_stage(root, out / preset, vae_ckpt, plan, args.seed, args.quick, preset,
                                               extra, out / 'token_cache')
        train_s[preset] = time.time() - t0
    t0 = time.time()
    sub = QUICK_SUBNET if args.quick else SUBNET
    ckpts[SUPERNET] = demo.train_model_stage(root, out / SUPERNET, vae_ckpt, plan, args.seed, args.quick, 'var-demo',
                                             ('--init_from', str(ckpts['var-demo']), '--subnet_depth', str(sub.depth),
                                              '--bridge', str(sub.bridge), *SUPERNET_ARGS), out / 'token_cache')
    train_s[SUPERNET] = time.time() - t0
    ref = demo.reference_npz(root, out)
    rows = []
    for label, model, schedule, policy, subnet in ROWS:
        if subnet is not None:
            subnet, label = sub, label.format(d=sub.depth, n=sub.bridge)
        sched = schedule or 'const:1'  # ignored by the explicit VAR
        extra = ('--kv_policy', policy)
        if subnet is not None:
            extra += ('--subnet_depth', str(subnet.depth), '--bridge', str(subnet.bridge))
        npz = demo.sample_set(ckpts[model], vae_ckpt, plan, sched, out / 'samples', args.seed, extra_args=extra,
                              name=label.replace(' ', '_').replace(':', '').replace(',', '-'))
        m = evaluate(ref, npz, device='cpu', fid_method='eigh')
        speed = demo.measure_speed(ckpts[model], vae_ckpt, sched, plan.cfg, n=10 if args.quick else 50,
                                   kv_policy=policy, subnet=subnet)
        vae, var = load_models(ckpts[model], vae_ckpt, device='meta')
        # FLOPs of the iterations the timed batch actually ran (an adaptive schedule decides them at run time).
        flops = sampling_flops(var.attach_vae(vae), ListSchedule(tuple(speed['iters_per_scale']))
                               if var.use_implicit else None, kv_policy=policy, subnet=subnet)
        rows.append({'row': label, 'params': num_params(var), 'schedule': schedule or '-', 'kv_policy': policy,
                     'subnet': None if subnet is None else [subnet.depth, subnet.bridge],
                     'fid': m['fid'], 'sfid': m['sfid'], 'precision': m['precision'], 'recall': m['recall'],
                     'images_per_s': speed['images_per_s'], 'kv_cache_MiB': speed['kv_cache_MiB'],
                     'iters_per_scale': speed['iters_per_scale'] if var.use_implicit else None,
                     'gflops_per_image': flops['total'] / 1e9})
        print(f"{label:>24}: FID {m['fid']:.2f} sFID {m['sfid']:.2f} P {m['precision']:.3f} R {m['recall']:.3f} "
              f"{speed['images_per_s']:.1f} img/s KV {speed['kv_cache_MiB']:.2f} MiB", flush=True)
    meta = {'command': 'python -m bench.reproduction ' + ' '.join(sys.argv[1:]), 'machine': machine(),
            'plan': demo.asdict(plan), 'train_seconds': train_s,
            'supernet_args': f'--subnet_depth {sub.depth} --bridge {sub.bridge} ' + ' '.join(SUPERNET_ARGS),
            'total_seconds': time.time() - started}
    results = out if args.quick else RESULTS  # a smoke run does not overwrite the committed results
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / 'reproduction.json', json.dumps({'meta': meta, 'rows': rows}, indent=1))
    write_text_atomic(results / 'reproduction.md', to_markdown(rows, meta))
    print(f'wrote {results / "reproduction.md"}')


def to_markdown(rows, meta) -> str:
    var_params = next(r['params'] for r in rows if r['row'] == 'VAR')
    viar_params = next(r['params'] for r in rows if r['row'].startswith('VIAR'))
    plan = meta['plan']
    lines = ['# Reproduction in miniature (VIAR paper Tables 1-3 on Fashion-MNIST 32x32)', '',
             f"Command: `{meta['command']}` ({meta['total_seconds'] / 60:.0f} min)  ",
             f"Machine: {machine_line(meta['machine'])}",
             '', f"Both models: the demo's tokenizer and data ({plan['train_per_class']} training images per class), "
             f"{plan['model_epochs']} epochs at batch {plan['batch_size']} (training took "
             f"{meta['train_seconds']['var-demo'] / 60:.1f} min for the VAR, "
             f"{meta['train_seconds']['viar-demo'] / 60:.1f} min for VIAR). VIAR has {viar_params:,} parameters, "
             f"{viar_params / var_params * 100:.1f} % of the VAR's {var_params:,}. Metrics: "
             f"{plan['samples_per_class'] * 10} samples (cfg {plan['cfg']}) against {plan['val_per_class'] * 10} "
             'validation images, offline Inception weights; images/s for batches of 50 on the CPU in float32; GFLOPs '
             'counted per image (both CFG halves, decoder included). VARiant rows: the VAR fine-tuned one more epoch '
             f"as a supernet (`{meta['supernet_args']}`, {meta['train_seconds'][SUPERNET] / 60:.1f} min), sampled at "
             'full depth and with the subnet; the "cut" row runs the same subnet of the plain VAR, without that '
             'training.',
             '',
             '| model / schedule | params | iterations per scale | FID | sFID | precision | recall | images/s | '
             'KV cache (MiB) | GFLOPs/image |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        iters = ','.join(map(str, r['iters_per_scale'])) if r['iters_per_scale'] else '-'
        lines.append(f"| {r['row']} | {r['params'] / 1e6:.2f}M | {iters} | {r['fid']:.2f} | {r['sfid']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['kv_cache_MiB']:.2f} | {r['gflops_per_image']:.3f} |")
    lines += ['', PAPER, VARIANT_PAPER, '']
    return '\n'.join(lines)


if __name__ == '__main__':
    main_entry(main, get_parser())
