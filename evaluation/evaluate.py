"""The ADM evaluation of a sample batch against a reference batch: Inception Score, FID, sFID, precision and
recall, with optional bootstrap standard errors."""
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from evaluation.batches import open_batch
from evaluation.inception import POOL_DIM
from evaluation.inception_weights import DEFAULT_BACKEND, DEFAULT_PRECISION, InceptionFeatures, load_inception
from evaluation.metrics import FRECHET_METHODS, class_probabilities, inception_score, precision_recall_hits
from evaluation.stats import BatchStats, batch_stats, save_stats
from evaluation.uncertainty import standard_errors
from utils.checkpoint import PathLike
from utils.cli import UserError, writable_dir

log = logging.getLogger('viar')

RESULT_NAMES = (('inception_score', 'Inception Score'), ('fid', 'FID'), ('sfid', 'sFID'),
                ('precision', 'Precision'), ('recall', 'Recall'))


@contextmanager
def strict_fp32():
    """Disable TF32 in cuDNN convolutions for the duration (the TF graph is evaluated in full float32)."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; asking for CUDA without it is a user error."""
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f'--device {device}: {e}') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {device}: CUDA is not available on this machine (use --device cpu)')
    return dev


def sample_inception_score(sample: BatchStats, network: InceptionFeatures,
                           shuffle_seed: Optional[int] = 0) -> Tuple[Optional[float], Optional[str]]:
    """(IS, None), or (None, why) when the weights carry no logits layer."""
    if network.logits_weight_KD is None:
        return None, network.no_logits_reason
    probs_NK = class_probabilities(torch.from_numpy(sample.pool_ND).to(network.device), network.logits_weight_KD)
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    return inception_score(probs_NK, rng=rng), None


def evaluate(ref_path: PathLike, sample_path: PathLike, device: Union[str, torch.device] = 'auto',
             batch_size: Optional[int] = None, weights: Optional[PathLike] = None, *,
             network: Optional[InceptionFeatures] = None, cache: bool = True, is_shuffle_seed: Optional[int] = 0,
             progress: bool = True, fid_method: str = 'scipy', resamples: int = 0,
             backend: str = DEFAULT_BACKEND, precision: str = DEFAULT_PRECISION) -> Dict[str, Any]:
    """ADM's five metrics of a sample batch against a reference batch.

    Returns {'inception_score', 'fid', 'sfid', 'precision', 'recall'} as floats; 'inception_score' is None when the
    weights have no logits, with the reason in 'inception_score_unavailable'. `weights` is a pytorch-fid-format
    file (None: the offline TorchScript network); a prebuilt `network` overrides `weights` and `device`.
    `batch_size` None: evaluation.stats.default_batch_size of the network's device (ADM's 64 on a GPU, fewer on a
    CPU, where they run faster).
    `is_shuffle_seed` seeds the shuffle before the IS splits (VIAR's evaluator shuffles unseeded); None: no shuffle.
    `fid_method`: 'scipy' (ADM's sqrtm) or 'eigh' (same value in exact arithmetic, much faster on a CPU).
    `resamples` > 0 adds bootstrap standard errors 'fid_se', 'sfid_se', 'precision_se', 'recall_se'
    (evaluation/uncertainty.py); the sample batch must then hold images, not only statistics.
    `backend` runs Inception fused for speed ('fast'), as the plain architecture ('eager') or as the offline
    TorchScript file ('torchscript'); the features agree within 1e-5 relative. `precision` 'bf16' runs it under
    bf16 autocast: faster, but its numbers are comparable only with other bf16 numbers (inception_weights.PRECISIONS).
    """
    if fid_method not in FRECHET_METHODS:
        raise UserError(f'unknown Fréchet method {fid_method!r}; choose from {sorted(FRECHET_METHODS)}')
    frechet = FRECHET_METHODS[fid_method]
    check_batch_size(batch_size)
    if resamples < 0:
        raise UserError(f'--bootstrap must be >= 0, got {resamples}')
    ref, sample = open_batch(ref_path), open_batch(sample_path)    # validate both before the long part
    if resamples and sample.images is None:
        raise UserError(f'{sample.path}: --bootstrap resamples the sample images; pass the images, not a stats file')
    if network is None:
        network = load_inception(weights, resolve_device(str(device)), backend, precision)
    with strict_fp32():
        log.info('reference batch:')
        ref_stats = batch_stats(ref, network, batch_size, cache, progress)
        log.info('sample batch:')
        sample_stats = batch_stats(sample, network, batch_size, cache, progress, spatial=resamples > 0)
    for name, stats in (('reference', ref_stats), ('sample', sample_stats)):
        if len(stats.pool_ND) <= POOL_DIM:
            log.warning(f'{name} batch has only {len(stats.pool_ND)} images: its pool_3 covariance is singular and '
                        f'FID is dominated by estimation bias (ADM uses 10k reference and 50k sample images)')
    log.info('computing evaluations...')
    inception, why = sample_inception_score(sample_stats, network, is_shuffle_seed)
    ref_pool = torch.from_numpy(ref_stats.pool_ND).to(network.device)
    sample_pool = torch.from_numpy(sample_stats.pool_ND).to(network.device)
    precision_hits, recall_hits = precision_recall_hits(ref_pool, sample_pool)
    results = {
        'inception_score': inception, 'inception_score_unavailable': why,
        'fid': frechet(sample_stats.fid, ref_stats.fid),
        'sfid': frechet(sample_stats.sfid, ref_stats.sfid),
        'precision': float(precision_hits.double().mean()), 'recall': float(recall_hits.double().mean()),
    }
    if resamples:
        results.update(standard_errors(sample_stats.pool_ND, sample_stats.spatial_NS, ref_stats.fid, ref_stats.sfid,
                                       precision_hits.cpu().numpy(), recall_hits.cpu().numpy(), resamples))
    return results


def format_results(results: Dict[str, Any]) -> List[str]:
    """ADM's output lines ('Inception Score: ...', 'FID: ...', ...); an unavailable IS says why."""
    lines = []
    for key, label in RESULT_NAMES:
        value = results[key]
        if value is None:
            lines.append(f'{label}: unavailable ({results[key + "_unavailable"]})')
        elif key + '_se' in results:
            lines.append(f'{label}: {value} (bootstrap standard error {results[key + "_se"]:.4g})')
        else:
            lines.append(f'{label}: {value}')
    return lines


def check_batch_size(batch_size: Optional[int]):
    if batch_size is not None and batch_size < 1:
        raise UserError(f'--batch-size must be >= 1, got {batch_size}')


def write_stats(input_path: PathLike, out_path: PathLike, device='auto', batch_size: Optional[int] = None,
                weights: Optional[PathLike] = None, progress: bool = True,
                backend: str = DEFAULT_BACKEND, precision: str = DEFAULT_PRECISION) -> BatchStats:
    """Compute the stats of one batch and write them as a stats .npz usable in place of that batch."""
    out_path = Path(out_path)
    check_batch_size(batch_size)
    batch = open_batch(input_path)
    if batch.images is None:
        raise UserError(f'{input_path}: is already a stats file')
    if out_path.resolve() == batch.path.resolve():
        raise UserError(f'--save-stats {out_path}: would overwrite the input')
    if not out_path.parent.is_dir():
        raise UserError(f'--save-stats {out_path}: folder {out_path.parent} does not exist')
    writable_dir(out_path.parent, '--save-stats', create=False)
    network = load_inception(weights, resolve_device(str(device)), backend, precision)
    with strict_fp32():
        stats = batch_stats(batch, network, batch_size, cache=False, progress=progress)
    save_stats(stats, out_path)
    return stats
