"""The reproduction in miniature as stages: Fashion-MNIST with its whole test set as the reference, the demo's tokenizer
recipe, a VAR and a VIAR trained alike, a VARiant supernet fine-tuned from the VAR; main rows at N images, a
quality-vs-compute curve at a smaller N, sampling speed and FLOPs per row, the implicit layer's convergence trace.

bench/reproduction.py runs `run(...)` and writes the report. Every stage reuses what a previous run finished (training,
sample sets, activations), and the reference activations are cached beside the prepared data, so a rerun skips them.
"""
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from bench.measure import sampling_flops
from evaluation.batches import open_batch
from evaluation.evaluate import strict_fp32
from evaluation.inception_weights import load_inception
from evaluation.stats import batch_stats, subset_batch
from models import num_params
from models.schedules import ListSchedule
from models.subnet import SubnetSpec
from pipelines import demo
from utils.cli import UserError
from utils.fashion_mnist import CLASS_NAMES, prepare
from utils.fileio import read_json_object, write_json_atomic
from utils.model_checkpoints import load_models

NUM_CLASSES = len(CLASS_NAMES)
FLOOR, RECONSTRUCTION = demo.FLOOR_ROW, demo.RECONSTRUCTION_ROW
PRESETS = {'var': 'var-demo', 'viar': 'viar-demo'}  # viar-demo has 39 % of var-demo's parameters (models/var.py)
TRAINED = {'var': 'VAR', 'viar': 'VIAR', 'supernet': 'VARiant supernet'}
# Rates on the 2-core machine behind `estimate` (images per second unless noted): PNG writing, tokenizer training
# (its PatchGAN tail included), VAR / VIAR (at FULL's S-JFB ranges) / supernet training, sampling with PNG and .npz
# writing, Inception in fp32 and in bf16. The committed run (bench/results/reproduction.md) measured tokenizer 122,
# VAR 99, VIAR 138, supernet 139 and sampling 85 on a fast day; the machine's speed drifts by 15-35 %, so the rates
# sit lower.
RATES = {'png': 800, 'tokenizer': 100, 'var': 85, 'viar': 130, 'supernet': 120, 'sampling': 70, 'inception-fp32': 12,
         'inception-bf16': 27}
BOOTSTRAP_S = {'large': 1.0, 'small': 0.3}  # one Fréchet resample (FID or sFID) at N > 2048 / N <= 2048 images
POOL_DIM = 2048
# Seconds per scored row: precision/recall (the reference's radii included), the Fréchet distances and the reference
# factor of the bootstrap; per speed point (load, warm-up, calibration, a batch); the convergence trace.
PR_S, FRECHET_S, SPEED_S, TRACE_S = 8, 6, 4, 10
# The supernet's fine-tuning: constant lr, phases 1 and 2 as fractions of its epochs (phase 3: the rest).
SUPERNET_LR, SUPERNET_PHASES = 2e-4, (0.2, 0.5)


@dataclass(frozen=True)
class ReproPlan:
    """Sizes and recipes of one reproduction run."""
    demo: demo.DemoPlan          # train/val images, the main N (floor_per_class = samples_per_class), the tokenizer
                                 # recipe, the training budget of both models (model_epochs, batch_size, model_lr),
                                 # cfg / top-k / top-p, bootstrap resamples
    test_per_class: Optional[int]   # reference images per class from the test set (None: all 10,000)
    curve_per_class: int         # images per class of each point of the quality-vs-compute curve
    no_grad_iters: Tuple[int, int]  # VIAR's S-JFB ranges (train.py --no_grad_iters_range / --grad_iters_range) ...
    grad_iters: Tuple[int, int]
    eval_iters: int              # ... and its validation iterations, which are also its main row's schedule
    curve_schedules: Tuple[str, ...]  # VIAR schedules of the curve (models/schedules.py syntax)
    subnet: SubnetSpec           # the VARiant subnet: depth d of the VAR's layers after a bridge of N scales
    supernet_epochs: int = 1
    viar_step_ratio: float = 1.0  # VIAR's training epochs over the VAR's (demo.model_epochs), rounded
    var_args: Tuple[str, ...] = ()    # train.py flags on top of the presets (quick mode: tiny sizes)
    viar_args: Tuple[str, ...] = ()
    speed_batch: int = 50

    @property
    def viar_epochs(self) -> int:
        return max(1, round(self.demo.model_epochs * self.viar_step_ratio))

    @property
    def main_schedule(self) -> str:
        return f'const:{self.eval_iters}'

    def viar_train_args(self) -> Tuple[str, ...]:
        return (*self.viar_args, '--no_grad_iters_range', *map(str, self.no_grad_iters),
                '--grad_iters_range', *map(str, self.grad_iters), '--eval_iters', str(self.eval_iters))

    def supernet_train_args(self, var_ckpt: Path) -> Tuple[str, ...]:
        # One fine-tuning run through all three phases (VARiant Alg. 1 shortened); the architecture is the VAR's.
        phase1, phase2 = (f * self.supernet_epochs for f in SUPERNET_PHASES)
        return ('--init_from', str(var_ckpt), '--subnet_depth', str(self.subnet.depth),
                '--bridge', str(self.subnet.bridge), '--ep', str(self.supernet_epochs), '--phase1_epochs', str(phase1),
                '--phase2_epochs', str(phase2), '--sche', 'const', '--tlr', str(SUPERNET_LR))


# The demo's recipe (pipelines/demo.py: unzoomed images, tokenizer betas 0.9/0.99 with a PatchGAN tail, 32 latent
# channels, the exact GELU in both transformers, base lr 0.02) on 10,000 training images, with 6 tokenizer epochs,
# 9 epochs for the VAR (its validation loss flat by then) and 1.44x its steps for VIAR (13 epochs), the ratio of the
# paper's Table 5 (VIAR 874.5 h at 413.85 ms per step, VAR-d30 766.5 h at 524.28 ms). VIAR's cheaper step makes its
# 13 epochs cost about the VAR's 9 here (15.7 vs 15.1 min in bench/results/reproduction.md).
FULL = ReproPlan(
    demo=replace(demo.FULL, train_per_class=1000, floor_per_class=500, samples_per_class=500, tokenizer_epochs=6,
                 model_epochs=9, resamples=20, schedules=('const:5',)),
    test_per_class=None, curve_per_class=50, viar_step_ratio=1.44, no_grad_iters=(0, 6), grad_iters=(1, 4),
    eval_iters=5,
    curve_schedules=('const:1', 'const:2', 'const:3', 'const:5', 'const:10', 'linear:5,2', 'adaptive:0.01,10',
                     'budget:18,6'),
    subnet=SubnetSpec(depth=3, bridge=3))
QUICK = ReproPlan(
    demo=replace(demo.QUICK, extra_train_args=(), schedules=('const:2',)), test_per_class=10, curve_per_class=2,
    no_grad_iters=(0, 2), grad_iters=(1, 2), eval_iters=2, curve_schedules=('const:1', 'const:2', 'budget:6,2'),
    subnet=SubnetSpec(depth=2, bridge=3), speed_batch=10,
    var_args=('--depth', '3', '--embed_dim', '64', '--num_heads', '2'), viar_args=demo.QUICK.extra_train_args)


@dataclass(frozen=True)
class Row:
    """One sampled configuration: a trained model ('var', 'viar' or 'supernet'), its schedule and KV policy, and
    whether it runs the plan's VARiant subnet."""
    label: str
    model: str
    schedule: str = 'const:1'    # VIAR's; an explicit VAR ignores it
    kv_policy: str = 'per_iteration'
    subnet: bool = False

    @property
    def slug(self) -> str:
        return ''.join(c if c.isalnum() else '-' for c in self.label).strip('-')

    def sampling_flags(self, plan: ReproPlan) -> Tuple[str, ...]:
        sub = ('--subnet_depth', str(plan.subnet.depth), '--bridge', str(plan.subnet.bridge)) if self.subnet else ()
        return ('--kv_policy', self.kv_policy, *sub)


def viar_row(schedule: str, kv_policy: str = 'per_iteration') -> Row:
    lean = ', lean KV' if kv_policy == 'lean' else ''
    return Row(f'VIAR `{schedule}`{lean}', 'viar', schedule, kv_policy)


def model_rows(plan: ReproPlan) -> List[Row]:
    """The main table's model rows, every one also a point of the curve."""
    sub = f'd{plan.subnet.depth} N{plan.subnet.bridge}'
    return [Row('VAR', 'var'), viar_row(plan.main_schedule), Row(f'VAR cut to subnet {sub}', 'var', subnet=True),
            Row('VARiant supernet, full depth', 'supernet'),
            Row(f'VARiant supernet, subnet {sub}', 'supernet', subnet=True)]


def curve_rows(plan: ReproPlan) -> List[Row]:
    """The curve's own VIAR points: every schedule, and the lean KV policy at the main schedule."""
    return [viar_row(s) for s in plan.curve_schedules if s != plan.main_schedule] + [
        viar_row(plan.main_schedule, 'lean')]


def estimate(plan: ReproPlan, train_tokenizer: bool = True, test_images: int = 10_000) -> Dict[str, float]:
    """Estimated seconds per stage on the 2-core machine (RATES); `test_images` when the test split is not limited."""
    d = plan.demo
    train, n = d.train_per_class * NUM_CLASSES, d.samples_per_class * NUM_CLASSES
    nc = plan.curve_per_class * NUM_CLASSES
    test = test_images if plan.test_per_class is None else plan.test_per_class * NUM_CLASSES
    main_sets, extra = len(model_rows(plan)), len(curve_rows(plan))
    inception = RATES[f'inception-{d.inception_precision}']
    scored_main, scored_curve = main_sets + 2, main_sets + extra + 2   # + floor and reconstructions

    def bootstrap(size: int) -> float:
        return 2 * d.resamples * BOOTSTRAP_S['large' if size > POOL_DIM else 'small']

    return {
        'prepare Fashion-MNIST': (train + d.val_per_class * NUM_CLASSES + test) / RATES['png'],
        'train the tokenizer': d.tokenizer_epochs * train / RATES['tokenizer'] if train_tokenizer else 0.0,
        'train VAR': d.model_epochs * train / RATES['var'],
        'train VIAR': plan.viar_epochs * train / RATES['viar'],
        'train VARiant supernet': plan.supernet_epochs * train / RATES['supernet'],
        'reference activations': test / inception,
        'sample the main rows': main_sets * n / RATES['sampling'],
        'score the main rows': scored_main * (n / inception + bootstrap(n) + PR_S + FRECHET_S),
        'sample the curve': extra * nc / RATES['sampling'],
        'score the curve': extra * nc / inception + scored_curve * (bootstrap(nc) + PR_S + FRECHET_S),
        'speed, FLOPs, convergence trace': (main_sets + extra) * SPEED_S + TRACE_S,
    }


def class_major_rows(per_class: int, first: int) -> List[int]:
    """Rows of the first `first` images of each class in a set of `per_class` images per class, class by class."""
    return [c * per_class + j for c in range(NUM_CLASSES) for j in range(first)]


def timed_once(marker: Path, fn: Callable[[], Path]) -> Tuple[Path, float]:
    """(fn(), seconds of the run that first produced it): a rerun that reuses fn's output keeps the first timing."""
    t0 = time.time()
    result = fn()
    if not marker.is_file():
        write_json_atomic(marker, {'seconds': time.time() - t0})
    return result, read_json_object(marker)['seconds']


def val_losses(log_txt: Path) -> List[float]:
    """val/L_mean after every epoch, from a trainer's JSON-lines log."""
    rows = [json.loads(line) for line in log_txt.read_text().splitlines() if line.strip()]
    return [r['val/L_mean'] for r in rows if 'val/L_mean' in r]


def train_models(root: Path, out: Path, vae_ckpt: Path, plan: ReproPlan, seed: int, quick: bool, stages) -> dict:
    """VAR and VIAR (plan.viar_epochs), then the supernet from the VAR: {model: {ckpt, seconds, val_losses}}."""
    args = dict(vae_ckpt=vae_ckpt, seed=seed, quick=quick, token_cache=out / 'token_cache')
    viar_plan = replace(plan.demo, model_epochs=plan.viar_epochs)
    trained = {}
    for model, extra in (('var', plan.var_args), ('viar', plan.viar_train_args()), ('supernet', None)):
        preset = PRESETS.get(model, PRESETS['var'])
        # The supernet's activation comes with the VAR checkpoint it starts from (--init_from).
        flags = (plan.supernet_train_args(trained['var']['ckpt']) if model == 'supernet'
                 else ('--mlp_act', plan.demo.mlp_act, *extra))
        ckpt, seconds = stages.run(f'train {TRAINED[model]}', timed_once, out / model / 'wall_time.json',
                                   lambda: demo.train_model_stage(root, out / model, preset=preset, extra_args=flags,
                                                                  plan=viar_plan if model == 'viar' else plan.demo,
                                                                  **args))
        trained[model] = {'ckpt': ckpt, 'seconds': seconds, 'val_losses': val_losses(out / model / 'log.txt'),
                          'flags': f'--preset {preset} ' + ' '.join(flags)}
    return trained


def prepare_data(data: Path, plan: ReproPlan, raw_dir: Optional[str]) -> Path:
    """The ImageFolder root: train (the models' data and the floor images), val (the trainers' validation), test."""
    return prepare(data, size=demo.IMAGE_SIZE, raw_dir=raw_dir, per_class=plan.demo.train_per_class,
                   val_per_class=plan.demo.val_per_class, test=True, test_per_class=plan.test_per_class)


def reference_npz(root: Path, precision: str) -> Path:
    """The test split as one image batch beside the prepared data, with its Inception activations cached there too
    (a rerun reads them back)."""
    files = sorted((root / 'test').rglob('*.png'))
    npz = demo.images_npz(files, root / f'test-{len(files)}.npz')
    with strict_fp32():
        batch_stats(open_batch(npz), load_inception(None, 'cpu', precision=precision))
    return npz


def sample_rows(rows: List[Row], ckpts: Dict[str, Path], vae_ckpt: Path, plan: ReproPlan, per_class: int,
                sample_dir: Path, seed: int) -> Dict[str, Path]:
    """sampling.py for every row: {label: .npz of per_class images of every class}."""
    sizes = replace(plan.demo, samples_per_class=per_class)
    return {r.label: demo.sample_set(ckpts[r.model], vae_ckpt, sizes, r.schedule, sample_dir, seed,
                                     extra_args=r.sampling_flags(plan), name=f'{r.slug}-{per_class}pc')
            for r in rows}


def real_sets(root: Path, vae_ckpt: Path, per_class: int, out: Path) -> Dict[str, Path]:
    """The floor images (the first per_class training images of every class) and their reconstructions."""
    floor = demo.floor_npz(root, out, per_class)
    rows = len(class_major_rows(per_class, per_class))
    if demo.npz_length(floor) != rows:
        raise UserError(f'--per_class {per_class}: the floor needs {rows} training images, {root / "train"} holds '
                        f'{demo.npz_length(floor)} of them')
    return {FLOOR: floor, RECONSTRUCTION: demo.reconstructions_npz(floor, vae_ckpt, out)}


def cost(row: Row, ckpts: Dict[str, Path], vae_ckpt: Path, plan: ReproPlan, seed: int) -> dict:
    """Parameters, images/s, KV-cache MiB, iterations per scale and GFLOPs per image of one row."""
    subnet = plan.subnet if row.subnet else None
    speed = demo.measure_speed(ckpts[row.model], vae_ckpt, row.schedule, plan.demo.cfg, n=plan.speed_batch,
                               kv_policy=row.kv_policy, subnet=subnet, seed=seed)
    vae, var = load_models(ckpts[row.model], vae_ckpt, device='meta')
    iters = speed['iters_per_scale'] if var.use_implicit else None
    # FLOPs of the iterations the timed batch ran (an adaptive schedule decides them at run time).
    flops = sampling_flops(var.attach_vae(vae), ListSchedule(tuple(iters)) if iters else None,
                           kv_policy=row.kv_policy, subnet=subnet)
    return {'params': num_params(var), 'images_per_s': speed['images_per_s'], 'kv_cache_MiB': speed['kv_cache_MiB'],
            'iters_per_scale': iters, 'gflops_per_image': flops['total'] / 1e9}


def run(plan: ReproPlan, out: Path, data: Path, raw_dir: Optional[str], seed: int, quick: bool,
        vae_ckpt: Optional[Path], trace_png: Path, stages) -> dict:
    """Every stage; returns what the report needs (JSON-ready apart from the checkpoint paths)."""
    root = stages.run('prepare Fashion-MNIST', prepare_data, data, plan, raw_dir)
    first_run = {}   # seconds of the training stages in the run that produced them (a rerun reuses them)
    if vae_ckpt is None:
        vae_ckpt, first_run['train the tokenizer'] = stages.run(
            'train the tokenizer', timed_once, out / 'tokenizer' / 'wall_time.json',
            lambda: demo.train_tokenizer_stage(root, out / 'tokenizer', plan.demo, seed, quick))
    trained = train_models(root, out, vae_ckpt, plan, seed, quick, stages)
    first_run.update({f'train {TRAINED[m]}': t['seconds'] for m, t in trained.items()})
    ckpts = {model: t['ckpt'] for model, t in trained.items()}
    reference = stages.run('reference activations', reference_npz, root, plan.demo.inception_precision)
    n, nc = plan.demo.samples_per_class, plan.curve_per_class
    main, curve = model_rows(plan), curve_rows(plan)
    main_dir, curve_dir = out / f'main-{n}pc', out / f'curve-{nc}pc'
    main_sets = stages.run('sample the main rows', lambda: {
        **real_sets(root, vae_ckpt, n, main_dir), **sample_rows(main, ckpts, vae_ckpt, plan, n, main_dir, seed)})
    metrics = stages.run('score the main rows', demo.score_sets, reference, main_sets, plan.demo.resamples,
                         plan.demo.inception_precision)
    # The curve's points of the main rows are the first nc images per class of their sets, scored from the cached
    # activations; its other VIAR points are sampled at nc.
    rows = class_major_rows(n, nc)
    curve_sets = {name: subset_batch(npz, rows, curve_dir / f'{npz.stem}-first{nc}pc.npz')
                  for name, npz in main_sets.items()}
    curve_sets.update(stages.run('sample the curve', sample_rows, curve, ckpts, vae_ckpt, plan, nc, curve_dir, seed))
    curve_metrics = stages.run('score the curve', demo.score_sets, reference, curve_sets,
                               plan.demo.resamples, plan.demo.inception_precision)

    def speed_and_trace() -> Dict[str, dict]:
        demo.trace_stage(ckpts['viar'], vae_ckpt, plan.demo, out / 'trace', trace_png)
        return {r.label: cost(r, ckpts, vae_ckpt, plan, seed) for r in main + curve}

    costs = stages.run('speed, FLOPs, convergence trace', speed_and_trace)
    return {'plan': {**asdict(plan), 'viar_epochs': plan.viar_epochs}, 'metrics': metrics,
            'curve_metrics': curve_metrics, 'costs': costs,
            'rows': [asdict(r) for r in main], 'curve_rows': [asdict(r) for r in curve],
            'training': {m: {k: v for k, v in t.items() if k != 'ckpt'} for m, t in trained.items()},
            'trace': read_json_object(out / 'trace' / 'trace.json'), 'reference_images': demo.npz_length(reference),
            'tokenizer': str(vae_ckpt), 'first_run_seconds': first_run}
