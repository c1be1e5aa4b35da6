"""Reconstruction quality of the demo tokenizer against its training time: why the demo's preset is what it is.

    python -m bench.tokenizer_study            # about 50 minutes on 2 CPU cores -> bench/results/tokenizer_study.md

Each configuration trains with the demo's recipe (bf16 autocast, L2 + L1, dead-code restarts, the PatchGAN tail) on the
demo's training images, keeping the checkpoint of every epoch; the reconstructions of the demo's floor images (100
training images per class) by each checkpoint are scored against the demo's reference (100 validation images per
class), beside the floor itself (the same real images, unreconstructed). Outputs in local_output/tokenizer_study;
a rerun reuses finished trainings and scores.
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Tuple

from bench.efficiency import machine, machine_line
from evaluation.quality_report import quality_table
from pipelines import demo
from training import train_tokenizer_cli
from utils.cli import ArgumentParser, main_entry
from utils.fashion_mnist import prepare
from utils.fileio import write_json_atomic, write_text_atomic
from utils.log import setup_logging

RESULTS = Path(__file__).resolve().parent / 'results'
# (label, train_tokenizer.py flags on top of the demo recipe, epochs, score every epoch or the last only): the demo's
# tokenizer epoch by epoch and the same recipe on a 16x16 latent, 4 epochs each; the demo's for 6 epochs (it trains 5)
# to see where more epochs stop paying; and more capacity at the 8x8 latent (wider low levels, deeper levels) for 5.
STUDY_EPOCHS = 4
DEMO_TOKENIZER = ('--preset', 'vae-demo-fmnist32')
CONFIGS = (
    ("8x8 latent, scales 1-8 (vae-demo-fmnist32, the demo's tokenizer)", DEMO_TOKENIZER, STUDY_EPOCHS, True),
    ('16x16 latent, scales 1-16 (vae-demo-fmnist32-16)', ('--preset', 'vae-demo-fmnist32-16'), STUDY_EPOCHS, True),
    ("8x8 latent, the demo's tokenizer for 6 epochs", DEMO_TOKENIZER, 6, True),
    ('8x8 latent, 128 instead of 64 channels at the 8x8 level (--ch_mult 1 2 4)',
     (*DEMO_TOKENIZER, '--ch_mult', '1', '2', '4'), 5, False),
    ('8x8 latent, 2 res blocks per level (--num_res_blocks 2)', (*DEMO_TOKENIZER, '--num_res_blocks', '2'), 5, False),
)
QUICK_CONFIGS = (('8x8 latent, quick', DEMO_TOKENIZER, 2, True),)


def get_parser() -> ArgumentParser:
    return demo.benchmark_parser(__doc__.split('\n\n')[0], 'local_output/tokenizer_study', 'data/fashion_mnist_demo')


def demo_setup(args) -> Tuple[demo.DemoPlan, Path, Path]:
    """(plan, output folder, prepared data root) of a run on the demo's data with the demo's plan."""
    setup_logging(0)
    plan = demo.QUICK if args.quick else demo.FULL
    root = prepare(Path(args.data), size=demo.IMAGE_SIZE, raw_dir=args.raw_dir, per_class=plan.train_per_class,
                   val_per_class=plan.val_per_class)
    return plan, Path(args.out), root


def train_with_epoch_checkpoints(root: Path, out: Path, plan: demo.DemoPlan, flags, epochs: int, seed: int,
                                 quick: bool):
    """Train one configuration; returns [(epoch, seconds since the start, checkpoint)] for every epoch."""
    marker = out / 'started.json'
    if not marker.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {'time': time.time()})
    started = json.loads(marker.read_text())['time']
    plan = replace(plan, tokenizer_epochs=epochs)  # the recipe's PatchGAN onset is a fraction of these epochs
    demo.call_cli(train_tokenizer_cli, demo.common_train_args(root, plan, seed, quick) + demo.tokenizer_recipe_args(
        plan) + ['--ep', str(epochs), '--keep_last', str(epochs), '--out_dir', str(out), *flags], 'tokenizer training')
    ckpts = sorted(out.glob('vae-ckpt-0*.pth'))
    return [(i + 1, ckpt.stat().st_mtime - started, ckpt) for i, ckpt in enumerate(ckpts)]


def main(args):
    started = time.time()
    plan, out, root = demo_setup(args)
    reference, floor = demo.reference_npz(root, out), demo.floor_npz(root, out, plan.floor_per_class)
    sets, extra = {demo.FLOOR_ROW: floor}, {}
    train_images = json.loads((root / 'prepared.json').read_text())['counts']['train']
    for c, (label, flags, epochs, every_epoch) in enumerate(QUICK_CONFIGS if args.quick else CONFIGS):
        run_dir = out / f'config{c}'
        for epoch, seconds, ckpt in train_with_epoch_checkpoints(root, run_dir, plan, flags, epochs, args.seed,
                                                                 args.quick):
            if not every_epoch and epoch < epochs:
                continue
            row = f'{label}, epoch {epoch}'
            sets[row] = demo.reconstructions_npz(floor, ckpt, run_dir / f'epoch{epoch}')
            extra[row] = {'training (s)': f'{seconds:.0f}', 'images seen': f'{epoch * train_images:,}'}
    metrics = demo.score_sets(reference, sets, plan.resamples, plan.inception_precision)
    meta = {'command': ' '.join(['python -m bench.tokenizer_study', *sys.argv[1:]]), 'machine': machine(),
            'plan': demo.asdict(plan), 'total_seconds': time.time() - started}
    lines = ['# Tokenizer study: reconstruction quality vs training time (Fashion-MNIST 32x32)', '',
             f"Command: `{meta['command']}` ({meta['total_seconds'] / 60:.0f} min in this invocation, which reuses "
             'the finished trainings and scores in its --out; the training column gives each run its own time)  ',
             f"Machine: {machine_line(meta['machine'])}", '',
             f"The demo's recipe (batch {plan.batch_size}, base lr {plan.tokenizer_lr}, betas "
             f'{plan.tokenizer_betas[0]}/{plan.tokenizer_betas[1]}, {plan.precision} autocast, L2 + L1, '
             f'{plan.tokenizer_z_channels} latent channels, cosine schedule over the epochs shown, PatchGAN x '
             f'{plan.gan_weight} with its discriminator at {plan.disc_lr_mult:g}x the lr from '
             f'{plan.gan_from:.0%} of the iterations) on {plan.train_per_class} training images per class. '
             'Rows: reconstructions of the floor images by the checkpoint after each epoch (the last one only '
             'for the two capacity rows), against the '
             f'{plan.val_per_class * 10} validation images (Inception in {plan.inception_precision}); ± is the '
             'bootstrap standard error. Training seconds '
             'include the per-epoch validation and checkpoint writes.', '',
             *quality_table(metrics, demo.FLOOR_ROW, extra, ('training (s)', 'images seen')), '']
    results = out if args.quick else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / 'tokenizer_study.json', {'meta': meta, 'metrics': metrics, 'extra': extra})
    write_text_atomic(results / 'tokenizer_study.md', '\n'.join(lines))
    print(f'wrote {results / "tokenizer_study.md"}')


if __name__ == '__main__':
    main_entry(main, get_parser())
