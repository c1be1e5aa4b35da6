"""What each change of the demo's training recipe buys, one change at a time, on the demo's data.

    python -m bench.demo_recipe            # about 18 minutes on 2 CPU cores -> bench/results/demo_recipe.md

Rows scored against the demo's reference (100 validation images per class), beside the floor (as many real training
images):
- the floor images zoomed as the official transform does (resize to 1.125x, centre crop): what training on zoomed
  images costs before any model is involved;
- the tokenizer trained for a short run (TOKENIZER_EPOCHS) with the official zoom and train_tokenizer.py's default
  betas (the old recipe), then unzoomed, then with the demo's betas too, then with the demo's PatchGAN tail too (the
  demo's recipe): reconstructions of the floor images;
- VIAR's validation loss after MODEL_EPOCHS epochs at the old and the demo's learning rate, on the tokens of one of
  those tokenizers (MODEL_TOKENIZER_ROW).
Outputs in local_output/demo_recipe.
"""
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from PIL import Image

from bench.efficiency import machine, machine_line
from bench.tokenizer_study import demo_setup
from evaluation.quality_report import quality_table
from pipelines import demo
from pipelines.reproduction import timed_once, val_losses
from training import train_tokenizer_cli
from training.data import build_transform
from utils.cli import ArgumentParser, main_entry
from utils.fileio import write_json_atomic, write_text_atomic
from utils.images import write_npz_stream

RESULTS = Path(__file__).resolve().parent / 'results'
OFFICIAL_ZOOM, OFFICIAL_BETAS, OLD_MODEL_LR = 1.125, (0.5, 0.9), 0.01
TOKENIZER_EPOCHS, MODEL_EPOCHS = 2, 2
MODEL_TOKENIZER_ROW = 2  # the tokenizer row whose tokens the two VIAR runs train on (unzoomed, the demo's betas)
ZOOMED_ROW = 'real training images zoomed 1.125x (the official transform)'


def get_parser() -> ArgumentParser:
    return demo.benchmark_parser(__doc__.split('\n\n')[0], 'local_output/demo_recipe', 'data/fashion_mnist_demo')


def tokenizer_variants(plan: demo.DemoPlan) -> Dict[str, demo.DemoPlan]:
    """Label -> plan of each tokenizer row: the old recipe, then one change at a time up to the demo's."""
    old = replace(plan, mid_reso=OFFICIAL_ZOOM, tokenizer_betas=OFFICIAL_BETAS, gan_weight=0.0)
    old_betas, betas = (f'betas {b[0]}/{b[1]}' for b in (OFFICIAL_BETAS, plan.tokenizer_betas))
    gan = f'PatchGAN x {plan.gan_weight} from {plan.gan_from:.0%} of the iterations'
    return {f'tokenizer, zoomed 1.125x, {old_betas} (old recipe)': old,
            f'tokenizer, unzoomed, {old_betas}': replace(old, mid_reso=plan.mid_reso),
            f'tokenizer, unzoomed, {betas}': replace(plan, gan_weight=0.0),
            f"tokenizer, unzoomed, {betas}, {gan} (the demo's recipe, 16 latent channels)": plan}


def zoomed_npz(files: List[Path], path: Path) -> Path:
    """The images as the official transform shows them to the token cache: resized to 1.125x, centre-cropped."""
    if not path.is_file():
        transform = build_transform(demo.IMAGE_SIZE, train=False, mid_reso=OFFICIAL_ZOOM)
        images = (transform(Image.open(f).convert('RGB')).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
                  .permute(1, 2, 0).numpy() for f in files)
        write_npz_stream(path, images, len(files), (demo.IMAGE_SIZE, demo.IMAGE_SIZE, 3))
    return path


def train_tokenizer(root: Path, out: Path, plan: demo.DemoPlan, seed: int, quick: bool) -> Tuple[Path, float]:
    """A short tokenizer run with `plan`'s recipe into `out`: (checkpoint, seconds of the run that trained it)."""
    def fit() -> Path:
        demo.call_cli(train_tokenizer_cli, demo.common_train_args(root, plan, seed, quick) + demo.tokenizer_recipe_args(
            plan) + ['--preset', plan.tokenizer_preset, '--ep', str(plan.tokenizer_epochs), '--out_dir', str(out)],
            'tokenizer training')
        return out / 'vae-ckpt-last.pth'
    return timed_once(out / 'trained.json', fit)


def model_losses(root: Path, out: Path, vae_ckpt: Path, plan: demo.DemoPlan, lr: float, seed: int,
                 quick: bool) -> List[float]:
    """VIAR's validation loss after each epoch of a run at base lr `lr` on `vae_ckpt`'s tokens."""
    demo.train_model_stage(root, out, vae_ckpt, replace(plan, model_lr=lr), seed, quick, plan.model_preset,
                           demo.model_args(plan), out.parent / 'token_cache')
    return val_losses(out / 'log.txt')


def main(args):
    started = time.time()
    plan, out, root = demo_setup(args)
    # The recipe as this bench measured it: the demo's later 32 latent channels, discriminator lr x 4 and exact GELU
    # were measured by full demo runs (README, Quick run), since a 2-epoch run's PatchGAN tail says little about them.
    plan = replace(plan, tokenizer_epochs=1 if args.quick else TOKENIZER_EPOCHS,
                   model_epochs=1 if args.quick else MODEL_EPOCHS, tokenizer_z_channels=16, disc_lr_mult=1.0,
                   mlp_act='gelu_tanh')
    reference, floor = demo.reference_npz(root, out), demo.floor_npz(root, out, plan.floor_per_class)
    sets = {demo.FLOOR_ROW: floor,
            ZOOMED_ROW: zoomed_npz(demo.first_per_class(root / 'train', plan.floor_per_class), out / 'zoomed.npz')}
    extra, ckpts = {}, []
    for i, (label, variant) in enumerate(tokenizer_variants(plan).items()):
        ckpt, seconds = train_tokenizer(root, out / f'tokenizer{i}', variant, args.seed, args.quick)
        sets[label] = demo.reconstructions_npz(floor, ckpt, out / f'tokenizer{i}')
        ckpts.append((label, ckpt))
        extra[label] = {'epochs': str(variant.tokenizer_epochs), 'training (s)': f'{seconds:.0f}'}
    metrics = demo.score_sets(reference, sets, plan.resamples, plan.inception_precision)
    tokens_of, vae_ckpt = ckpts[MODEL_TOKENIZER_ROW]
    losses = {lr: model_losses(root, out / f'viar_lr{lr}', vae_ckpt, plan, lr, args.seed, args.quick)
              for lr in (OLD_MODEL_LR, plan.model_lr)}

    meta = {'command': ' '.join(['python -m bench.demo_recipe', *sys.argv[1:]]), 'machine': machine(),
            'plan': demo.asdict(plan), 'total_seconds': time.time() - started}
    lines = ['# The demo\'s training recipe, one change at a time (Fashion-MNIST 32x32)', '',
             f"Command: `{meta['command']}` ({meta['total_seconds'] / 60:.0f} min in this invocation, which reuses "
             'finished training runs in its --out; the training column gives each run\'s first time)  ',
             f"Machine: {machine_line(meta['machine'])}", '',
             f'Every row against the demo\'s {plan.val_per_class * 10} validation images (Inception in '
             f'{plan.inception_precision}); ± is the bootstrap standard error over {plan.resamples} resamples. The '
             f'tokenizer rows reconstruct the floor images after {plan.tokenizer_epochs} epoch(s) of the demo\'s '
             f'tokenizer recipe (batch {plan.batch_size}, base lr {plan.tokenizer_lr}, bf16, L2 + L1) with the zoom '
             'and the AdamW betas shown; the official transform resizes each training image to 1.125x its size and '
             'crops it back, which zooms it in by 12.5 % against unzoomed reference images.', '',
             *quality_table(metrics, demo.FLOOR_ROW, extra, ('epochs', 'training (s)')), '',
             f'VIAR (`{plan.model_preset}`, batch {plan.batch_size}, bf16) on the tokens of the row "{tokens_of}", '
             f'validation loss (val/L_mean) after each of {plan.model_epochs} epoch(s):', '',
             '| base lr | validation loss |', '|---|---|',
             *[f'| {lr} | {" → ".join(f"{v:.3f}" for v in vals)} |' for lr, vals in losses.items()], '']
    results = out if args.quick else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / 'demo_recipe.json', {'meta': meta, 'metrics': metrics, 'extra': extra,
                                                     'val_losses': {str(k): v for k, v in losses.items()}})
    write_text_atomic(results / 'demo_recipe.md', '\n'.join(lines))
    print(f'wrote {results / "demo_recipe.md"}')


if __name__ == '__main__':
    main_entry(main, get_parser())
