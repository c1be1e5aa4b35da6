"""The CPU demo, end to end on real data: Fashion-MNIST -> tokenizer -> VIAR -> samples -> FID / sFID / P / R.

    bash scripts/demo.sh            # full demo (about 13 minutes on 2 CPU cores)
    bash scripts/demo.sh --quick    # smoke run with tiny sizes (under 2 minutes)

Every stage calls the project's own command-line tools (train_tokenizer.py, train.py, gen_img.py, sampling.py,
evaluator.py) in this process, and writes into --out (local_output/demo by default): the sample grid, loss curves,
the convergence plot of the implicit layer, and report.md with the numbers, configuration and wall times. Re-running
is safe and quick: finished training, samples and statistics are reused.

The command is demo.py (a thin entry point); bench/reproduction.py and bench/tokenizer_study.py reuse its stages.
"""
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from evaluation.batches import IMAGES_KEY, npz_headers
from evaluation.evaluate import evaluate, format_results
from evaluation.inception_weights import load_inception
from evaluation.quality_report import quality_table, target_lines
from generation import gen_img_cli, sampling_cli
from models import num_params
from training import train_cli, train_tokenizer_cli
from utils.cli import SEED, ArgumentParser, UserError, run, writable_dir
from utils.fashion_mnist import CLASS_NAMES, DONE_FILE, prepare
from utils.fileio import copy_atomic, read_json_object, write_json_atomic, write_text_atomic
from utils.images import load_png_rgb, to_uint8_hwc, write_npz_stream
from utils.log import setup_logging
from utils.model_checkpoints import load_models, load_vae
from utils.plots import plot_training_curves

log = logging.getLogger('viar')
FLOOR_ROW = 'real training images (floor)'
RECONSTRUCTION_ROW = 'tokenizer reconstructions'
IMAGE_SIZE = 32
TRACE_SCHEDULE = 'const:10'  # iterations per scale of the convergence trace: enough to see the residual settle
# Quality targets of the full demo: FID as a multiple of the floor row's, precision and recall of the VIAR samples.
TARGET_RECONSTRUCTION, TARGET_FID, TARGET_PRECISION, TARGET_RECALL = 1.5, 2.5, 0.5, 0.3


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run."""
    train_per_class: int
    val_per_class: int           # validation images: the reference set of every metric
    floor_per_class: int         # real training images scored like a sample set (the floor row)
    tokenizer_epochs: int
    model_epochs: int
    batch_size: int
    samples_per_class: int       # generated images per class for the metrics
    grid_seeds: int              # columns of the sample grid (one row per class)
    schedules: Tuple[str, ...]   # implicit-iteration schedules to evaluate; the first one draws the grid
    tokenizer_lr: float = 0.02   # base lr per 256 images (train_tokenizer.py --tblr)
    tokenizer_betas: Tuple[float, float] = (0.9, 0.99)  # AdamW betas (train_tokenizer.py --betas). Its default
                                 # (0.5, 0.9) suits GAN training; without the GAN, 2 epochs reach FID 91 instead of 102
    gan_weight: float = 0.05     # PatchGAN term of the tokenizer (train_tokenizer.py --gan_weight; 0: off) ...
    gan_from: float = 0.75       # ... switched on after this fraction of its iterations (in the last epoch of 4 it
                                 # took reconstructions from FID 58.4 to 49.3 and recall from 0.19 to 0.25; after
                                 # only 2 epochs the same tail hurts: bench.demo_recipe)
    disc_lr_mult: float = 4.0    # the discriminator's lr over the tokenizer's (--disc_lr_mult): at 1 it stays near
                                 # chance and its gradients tint the grey reconstructions (R +4/255 on average),
                                 # which cost precision (0.57; 0.72 once greyed); at 4 the tint is gone
    tokenizer_z_channels: int = 32  # latent channels (--z_channels; the preset has 16): 32 reconstructs the same
                                 # 8x8 tokens sharper (PSNR 23.2 vs 22.7 dB) for 6 % more parameters, and the
                                 # transformer's cost does not change
    model_lr: float = 0.02       # base lr per 256 images (train.py --tblr)
    mlp_act: str = 'gelu'        # train.py --mlp_act: the exact GELU instead of the official tanh form (within 5e-4 of
                                 # it; its CPU kernel is 2.5x faster, a VIAR step 13 % faster: bench.train_step)
    cfg: float = 2.0
    top_k: int = 0
    top_p: float = 0.0
    precision: str = 'bf16'      # training autocast (train.py / train_tokenizer.py --precision)
    mid_reso: float = 1.0        # train.py / train_tokenizer.py --mid_reso: 1 trains on the images as they are; the
                                 # official 1.125 zooms every training image in by 12.5 %, which the unzoomed reference
                                 # set penalises (zoomed real images score FID 30.7, the floor 21.8: bench.demo_recipe)
    resamples: int = 100         # bootstrap resamples behind every standard error
    inception_precision: str = 'bf16'  # evaluator.py --inception-precision of every scored set (bf16: ~2.7x faster
                                       # on a CPU; FIDs 1-2 % off fp32's, so compare rows only with each other)
    tokenizer_preset: str = 'vae-demo-fmnist32'
    model_preset: str = 'viar-demo'
    extra_train_args: Tuple[str, ...] = field(default_factory=tuple)


FULL = DemoPlan(train_per_class=600, val_per_class=100, floor_per_class=100, tokenizer_epochs=5, model_epochs=5,
                batch_size=32, samples_per_class=100, grid_seeds=8, schedules=('const:3',), resamples=20)
QUICK = DemoPlan(train_per_class=40, val_per_class=4, floor_per_class=4, tokenizer_epochs=1, model_epochs=1,
                 batch_size=16, samples_per_class=4, grid_seeds=2, schedules=('const:2',), resamples=10,
                 extra_train_args=('--depth', '2', '--embed_dim', '64', '--num_heads', '2'))


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run of every stage in under 2 minutes')
    p.add_argument('--out', default=None, help='output folder (default local_output/demo or local_output/demo-quick)')
    p.add_argument('--data', default=None, help='ImageFolder root to create (default data/fashion_mnist_demo[_quick])')
    p.add_argument('--raw_dir', default=None, help='Fashion-MNIST idx files (default: the Debian package)')
    p.add_argument('--seed', type=SEED, default=0)
    return p


def benchmark_parser(description: str, out: str, data: str) -> ArgumentParser:
    """The flags of the benchmarks that run the demo's stages on Fashion-MNIST (bench/)."""
    p = ArgumentParser(description=description)
    p.add_argument('--out', default=out)
    p.add_argument('--data', default=data, help='ImageFolder root to create')
    p.add_argument('--raw_dir', default=None, help='Fashion-MNIST idx files (default: the Debian package)')
    p.add_argument('--seed', type=SEED, default=0)
    p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run, numbers meaningless')
    return p


class Stages:
    """Runs the numbered stages, announces them and records their wall times."""

    def __init__(self, total: int):
        self.total, self.index, self.times = total, 0, {}

    def run(self, name: str, fn, *args, **kwargs):
        self.index += 1
        log.info(f'[demo] stage {self.index}/{self.total}: {name}')
        t0 = time.time()
        out = fn(*args, **kwargs)
        self.times[name] = time.time() - t0
        log.info(f'[demo] {name}: done in {self.times[name]:.0f}s')
        return out


def call_cli(module, argv: List[str], what: str):
    """Run a project CLI in this process; a failure stops the demo with that tool's message already printed."""
    code = run(module.main, module.get_parser(), argv)
    if code:
        raise UserError(f'{what} failed (exit code {code}); its error is printed above')
    setup_logging(0)  # the tools reconfigure logging; restore the demo's


def common_train_args(root: Path, plan: DemoPlan, seed: int, quick: bool) -> List[str]:
    return ['--data_path', str(root), '--bs', str(plan.batch_size), '--seed', str(seed), '--workers', '1',
            '--precision', plan.precision, '--mid_reso', str(plan.mid_reso),
            '--device', 'cpu', '--save_freq', '1', '--log_freq', '10' if quick else '20']


def gan_args(plan: DemoPlan) -> List[str]:
    """train_tokenizer.py flags of the PatchGAN term, on from plan.gan_from of the iterations."""
    if not plan.gan_weight:
        return []
    iterations = plan.train_per_class * len(CLASS_NAMES) // plan.batch_size * plan.tokenizer_epochs
    return ['--gan_weight', str(plan.gan_weight), '--disc_start', str(int(iterations * plan.gan_from)),
            '--disc_lr_mult', str(plan.disc_lr_mult)]


def tokenizer_recipe_args(plan: DemoPlan) -> List[str]:
    """train_tokenizer.py flags of the demo's recipe: learning rate, betas, L2 + L1, dead-code restarts, PatchGAN."""
    return ['--tblr', str(plan.tokenizer_lr), '--betas', *map(str, plan.tokenizer_betas), '--l1_weight', '1.0',
            '--restart_every', '50', '--z_channels', str(plan.tokenizer_z_channels), *gan_args(plan)]


def train_tokenizer_stage(root: Path, tok_dir: Path, plan: DemoPlan, seed: int, quick: bool) -> Path:
    """train_tokenizer.py with the demo preset; returns the checkpoint (a finished run is reused)."""
    call_cli(train_tokenizer_cli, common_train_args(root, plan, seed, quick) + tokenizer_recipe_args(plan) + [
        '--preset', plan.tokenizer_preset, '--ep', str(plan.tokenizer_epochs), '--out_dir', str(tok_dir)],
        'tokenizer training')
    return tok_dir / 'vae-ckpt-last.pth'


def train_model_stage(root: Path, model_dir: Path, vae_ckpt: Path, plan: DemoPlan, seed: int, quick: bool,
                      preset: str, extra_args, token_cache: Path) -> Path:
    """train.py on the tokenizer's pyramids; returns the checkpoint (a finished run is reused)."""
    call_cli(train_cli, common_train_args(root, plan, seed, quick) + [
        '--vae_ckpt', str(vae_ckpt), '--preset', preset, '--ep', str(plan.model_epochs), '--tblr', str(plan.model_lr),
        '--token_cache', str(token_cache), '--out_dir', str(model_dir), *extra_args], f'{preset} training')
    return model_dir / 'ar-ckpt-last.pth'


def model_args(plan: DemoPlan) -> List[str]:
    """train.py flags of the plan's transformer on top of its preset."""
    return ['--mlp_act', plan.mlp_act, *plan.extra_train_args]


def sample_name(schedule: str) -> str:
    """The file name (no suffix) of a schedule's sample set under <out>/samples."""
    return schedule.replace(':', '_').replace(',', '-')


def sample_set(ckpt: Path, vae_ckpt: Path, plan: DemoPlan, schedule: str, sample_dir: Path, seed: int,
               extra_args=(), name: str = '') -> Path:
    """sampling.py: plan.samples_per_class images of every class; returns the .npz (finished sets are reused)."""
    name = name or sample_name(schedule)
    call_cli(sampling_cli, sample_args(ckpt, vae_ckpt, plan, schedule) + [
        '--per_class', str(plan.samples_per_class), '--batch_size', '50', '--seed', str(seed),
        '--sample_dir', str(sample_dir), '--name', name, *extra_args], f'sampling ({name})')
    return sample_dir / f'{name}.npz'


def images_npz(files: List[Path], path: Path) -> Path:
    """PNG files as an ADM image batch (uint8 NHWC .npz), written once."""
    if path.is_file():
        return path
    if not files:
        raise UserError(f'no images for {path.name}')
    write_npz_stream(path, (load_png_rgb(f) for f in files), len(files), (IMAGE_SIZE, IMAGE_SIZE, 3))
    return path


def npz_length(path: Path) -> int:
    """Images in an image batch .npz (from its header)."""
    return npz_headers(Path(path))[IMAGES_KEY][0][0]


def first_per_class(split_dir: Path, per_class: int) -> List[Path]:
    """The first `per_class` PNGs (by name) of every class folder."""
    classes = sorted(d for d in split_dir.iterdir() if d.is_dir())
    return [f for c in classes for f in sorted(c.glob('*.png'))[:per_class]]


def reference_npz(data_root: Path, out: Path) -> Path:
    """The validation images: the reference batch of every metric (its activations are cached beside it)."""
    return images_npz(sorted((data_root / 'val').rglob('*.png')), out / 'reference.npz')


def floor_npz(data_root: Path, out: Path, per_class: int) -> Path:
    """Real training images, as many as a sample set: scored against the reference, they give the floor at this N."""
    return images_npz(first_per_class(data_root / 'train', per_class), out / 'floor.npz')


def reconstructions_npz(source: Path, vae_ckpt: Path, out: Path) -> Path:
    """The tokenizer's reconstructions of the floor images: what the decoder alone costs in the metrics."""
    path = out / 'reconstructions.npz'
    if path.is_file() and path.stat().st_mtime > vae_ckpt.stat().st_mtime:
        return path
    vae = load_vae(vae_ckpt)
    with np.load(source) as f:
        images = f['arr_0']
    with torch.inference_mode():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        rec = torch.cat([vae.img_to_reconstructed_img(chunk, last_one=True) for chunk in x.split(100)])
    write_npz_stream(path, to_uint8_hwc(rec.add(1).mul(0.5)), len(rec), images.shape[1:])
    return path


def score_sets(reference: Path, sets: Dict[str, Path], resamples: int, precision: str) -> Dict[str, dict]:
    """evaluation.evaluate of every set against the reference, with bootstrap standard errors and the set size,
    Inception run in `precision`."""
    network = load_inception(None, 'cpu', precision=precision)
    results = {}
    for name, npz in sets.items():
        results[name] = evaluate(reference, npz, network=network, fid_method='eigh', resamples=resamples)
        results[name]['n'] = npz_length(npz)
        log.info(f'[demo] {name}: ' + ', '.join(format_results(results[name])))
    return results


def sample_args(ckpt: Path, vae_ckpt: Path, plan: DemoPlan, schedule: str) -> List[str]:
    return ['--ckpt', str(ckpt), '--vae_ckpt', str(vae_ckpt), '--cfg', str(plan.cfg), '--top_k', str(plan.top_k),
            '--top_p', str(plan.top_p), '--schedule', schedule, '--device', 'cpu']


def measure_speed(ckpt: Path, vae_ckpt: Path, schedule: str, cfg: float, n: int = 50,
                  kv_policy: str = 'per_iteration', subnet=None, seed: int = 0) -> Dict[str, float]:
    """Images/s and KV-cache bytes of the sampler for one schedule (batch of n, after a warm-up); `subnet` switches an
    explicit VAR to a VARiant subnet. A budget schedule is calibrated first (with `seed`, as sampling.py does), outside
    the timing."""
    from models.sampler import autoregressive_infer_cfg, image_seed, resolve_schedule
    from models.schedules import parse_schedule
    vae, var = load_models(ckpt, vae_ckpt)
    labels = torch.arange(n) % var.num_classes
    resolved = resolve_schedule(var, parse_schedule(schedule), seed=seed, cfg=cfg, kv_policy=kv_policy)
    kw = dict(cfg=cfg, schedule=resolved, image_seeds=[image_seed(0, i) for i in range(n)],
              kv_policy=kv_policy, subnet=subnet)
    autoregressive_infer_cfg(var, 4, labels[:4], **{**kw, 'image_seeds': kw['image_seeds'][:4]})
    stats = {}
    t0 = time.perf_counter()
    autoregressive_infer_cfg(var, n, labels, stats=stats, **kw)
    return {'images_per_s': n / (time.perf_counter() - t0), 'kv_cache_MiB': stats['kv_bytes'] / 2 ** 20,
            'iters_per_scale': stats['iters']}


def trace_stage(ckpt: Path, vae_ckpt: Path, plan: DemoPlan, trace_dir: Path, png: Path):
    """gen_img.py --trace: the residual and cosine curves per scale (paper Fig. 3), one image per class at
    TRACE_SCHEDULE, copied to `png` (trace_dir keeps trace.json)."""
    call_cli(gen_img_cli, sample_args(ckpt, vae_ckpt, plan, TRACE_SCHEDULE) + [
        '--classes', '0-9', '--seeds', '0', '--trace', '--out_dir', str(trace_dir)], 'convergence trace')
    copy_atomic(trace_dir / 'trace.png', png)


def target_checks(metrics: Dict[str, dict], schedules: Sequence[str]) -> List[tuple]:
    """The demo's quality targets as (what, measured, met): the tokenizer near the floor, VIAR samples close to it."""
    floor = metrics[FLOOR_ROW]['fid']
    rec = metrics[RECONSTRUCTION_ROW]['fid'] / floor
    checks = [(f'tokenizer reconstructions FID <= {TARGET_RECONSTRUCTION}x the floor', f'{rec:.2f}x',
               rec <= TARGET_RECONSTRUCTION)]
    m = metrics[schedules[0]]
    checks += [(f'VIAR `{schedules[0]}` FID <= {TARGET_FID}x the floor', f'{m["fid"] / floor:.2f}x',
                m['fid'] / floor <= TARGET_FID),
               (f'VIAR `{schedules[0]}` precision >= {TARGET_PRECISION}', f'{m["precision"]:.3f}',
                m['precision'] >= TARGET_PRECISION),
               (f'VIAR `{schedules[0]}` recall >= {TARGET_RECALL}', f'{m["recall"]:.3f}', m['recall'] >= TARGET_RECALL)]
    return checks


def write_report(out: Path, plan: DemoPlan, quick: bool, times: Dict[str, float], metrics: Dict[str, dict],
                 speed: Dict[str, dict], params: Dict[str, int], data_counts: dict, started: float):
    total = time.time() - started
    rows = {(f'VIAR `{k}`' if k in speed else k): v for k, v in metrics.items()}
    extra = {f'VIAR `{s}`': {'iterations per scale': ','.join(map(str, v['iters_per_scale'])),
                             'images/s': f'{v["images_per_s"]:.1f}', 'KV cache (MiB)': f'{v["kv_cache_MiB"]:.2f}'}
             for s, v in speed.items()}
    n_ref = data_counts.get('val')
    lines = [f'# VIAR CPU demo{" (quick mode)" if quick else ""}', '',
             f'Fashion-MNIST at {IMAGE_SIZE}x{IMAGE_SIZE}: {data_counts.get("train")} training and {n_ref} validation '
             f'images (10 classes). Total wall time **{total / 60:.1f} min** on {torch.get_num_threads()} CPU '
             f'thread(s), torch {torch.__version__}.', '',
             '![samples](samples_grid.png)', '',
             f'One row per class ({", ".join(CLASS_NAMES)}), {plan.grid_seeds} seeds each, schedule '
             f'`{plan.schedules[0]}`, cfg {plan.cfg}.', '',
             '## Metrics', '',
             f'Every row is scored against the same {n_ref} validation images (ADM protocol, offline Inception '
             f'weights run in {plan.inception_precision}, Fréchet distances through `--fid-method eigh`). The floor '
             'row scores as many real training images: no model can beat it at this N, since FID carries an '
             'estimation bias that shrinks only with N. '
             'The reconstruction row passes those same training images through the tokenizer, which every sample '
             f'also passes through. ± is the bootstrap standard error over {plan.resamples} resamples of each set '
             '(the counted points for precision and recall); rows whose intervals overlap are not distinguishable at '
             'this N.', '',
             *quality_table(rows, FLOOR_ROW, extra, ('iterations per scale', 'images/s', 'KV cache (MiB)')), '',
             'Targets:', '', *target_lines(target_checks(metrics, plan.schedules))]
    if any(m['inception_score'] is None for m in metrics.values()):
        reason = next(m['inception_score_unavailable'] for m in metrics.values() if m['inception_score'] is None)
        lines += ['', f'Inception Score: unavailable ({reason}).']
    lines += ['', '## Training', '', '![losses](loss_curves.png)', '',
              '## Convergence of the implicit layer', '',
              'Relative residual ||z_{t+1} - z_t|| / ||z_t|| and cosine similarity per fixed-point iteration, one line '
              'per scale (paper Fig. 3 analogue), traced while drawing the grid with 10 iterations per scale.', '',
              '![convergence](convergence.png)', '',
              '## Configuration', '',
              f'- tokenizer: preset `{plan.tokenizer_preset}` with {plan.tokenizer_z_channels} latent channels, '
              f'{params["tokenizer"]:,} parameters, {plan.tokenizer_epochs} epoch(s), batch {plan.batch_size}, '
              f'base lr {plan.tokenizer_lr}, betas {plan.tokenizer_betas[0]}/{plan.tokenizer_betas[1]}, '
              f'{plan.precision}, PatchGAN x {plan.gan_weight} from {plan.gan_from:.0%} of the iterations '
              f'(discriminator lr x {plan.disc_lr_mult:g})',
              f'- VIAR: preset `{plan.model_preset}` {" ".join(model_args(plan))}, '
              f'{params["model"]:,} parameters, '
              f'{plan.model_epochs} epoch(s), batch {plan.batch_size}, base lr {plan.model_lr}, {plan.precision}',
              f'- sampling: cfg {plan.cfg}, top-k {plan.top_k or "off"}, top-p {plan.top_p or "off"}',
              f'- plan: `{json.dumps(asdict(plan))}`', '',
              '## Wall times', '', '| stage | seconds |', '|---|---|']
    lines += [f'| {name} | {sec:.0f} |' for name, sec in times.items()]
    lines += [f'| **total** | **{total:.0f}** |', '']
    write_text_atomic(out / 'report.md', '\n'.join(lines) + '\n')


def main(args):
    setup_logging(0)
    started = time.time()
    plan = QUICK if args.quick else FULL
    out = writable_dir(args.out or ('local_output/demo-quick' if args.quick else 'local_output/demo'), '--out')
    data = writable_dir(args.data or ('data/fashion_mnist_demo_quick' if args.quick else 'data/fashion_mnist_demo'),
                        '--data')
    stages = Stages(total=7)

    root = stages.run('prepare Fashion-MNIST', prepare, data, size=IMAGE_SIZE, raw_dir=args.raw_dir,
                      per_class=plan.train_per_class, val_per_class=plan.val_per_class)
    data_counts = read_json_object(root / DONE_FILE).get('counts', {})

    tok_dir, model_dir = out / 'tokenizer', out / 'viar'
    vae_ckpt = stages.run('train the tokenizer', train_tokenizer_stage, root, tok_dir, plan, args.seed, args.quick)
    ckpt = stages.run('train VIAR', train_model_stage, root, model_dir, vae_ckpt, plan, args.seed, args.quick,
                      plan.model_preset, model_args(plan), out / 'token_cache')

    grid_dir = out / 'grid'
    stages.run('sample the grid and trace the implicit layer', call_cli, gen_img_cli, sample_args(
        ckpt, vae_ckpt, plan, plan.schedules[0]) + ['--classes', '0-9', '--seeds', f'0-{plan.grid_seeds - 1}',
                                                   '--save_grid', '--out_dir', str(grid_dir)], 'grid sampling')
    copy_atomic(grid_dir / 'grid.png', out / 'samples_grid.png')
    trace_stage(ckpt, vae_ckpt, plan, out / 'trace', out / 'convergence.png')

    npzs = stages.run('sample images for the metrics', lambda: {
        s: sample_set(ckpt, vae_ckpt, plan, s, out / 'samples', args.seed) for s in plan.schedules})

    floor = floor_npz(root, out, plan.floor_per_class)
    metrics = stages.run('evaluate FID / sFID / precision / recall', lambda: score_sets(
        reference_npz(root, out), {FLOOR_ROW: floor, RECONSTRUCTION_ROW: reconstructions_npz(floor, vae_ckpt, out),
                                   **npzs}, plan.resamples, plan.inception_precision))
    speed = stages.run('measure sampling speed per schedule',
                       lambda: {s: measure_speed(ckpt, vae_ckpt, s, plan.cfg, n=10 if args.quick else 50)
                                for s in plan.schedules})

    plot_training_curves(tok_dir / 'log.txt', model_dir / 'log.txt', out / 'loss_curves.png')
    vae, var = load_models(ckpt, vae_ckpt)
    params = {'tokenizer': num_params(vae), 'model': num_params(var)}
    write_json_atomic(out / 'metrics.json', {'metrics': metrics, 'speed': speed, 'times': stages.times,
                                             'params': params, 'plan': asdict(plan)})
    write_report(out, plan, args.quick, stages.times, metrics, speed, params, data_counts, started)
    log.info(f'[demo] finished in {(time.time() - started) / 60:.1f} min: {out / "report.md"}, '
             f'{out / "samples_grid.png"}, {out / "loss_curves.png"}, {out / "convergence.png"}')
