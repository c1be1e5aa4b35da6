"""Inception activations of a batch and their statistics, with the cache beside the batch
(`<batch>.<weights>.stats.npz`, reused while newer than the batch); the stats files of --save-stats; subsets of a
batch that carry its cached activations along."""
import glob
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from evaluation.batches import POOL_KEY, Batch, ImageSource, NpzImages, load_stored_stats, npz_headers, open_batch
from evaluation.inception import POOL_DIM, SPATIAL_DIM
from evaluation.inception_weights import InceptionFeatures
from evaluation.metrics import GaussianStats, gaussian_stats
from utils.checkpoint import PathLike
from utils.cli import UserError
from utils.fileio import atomic_write
from utils.images import write_npz_stream

log = logging.getLogger('viar')

DEFAULT_BATCH_SIZE = 64                      # ADM's activation batch: the default on a GPU
CPU_BATCH_SIZE = 16                          # the default on a CPU: 1.1-1.25x the images/s of 64 on 2 cores (bf16
                                             # and fp32: bench/results/inception_batch_cpu.md); same features
SPATIAL_KEY = 'spatial'                      # stats files, optional: float32 mixed_6/conv activations (N, 2023)
WEIGHTS_KEY = 'weights_id'                   # stats files: which Inception weights (and precision) produced them
CACHE_SUFFIX = '.stats.npz'
WEIGHTS_TAG_CHARS = 8                        # hex digits of the weights hash in a cache file name


@dataclass
class BatchStats:
    """What the metrics need from one batch: pool_3 activations and the two Gaussians."""
    pool_ND: np.ndarray      # float32 (N, 2048): Inception Score and precision/recall
    fid: GaussianStats       # pool_3 statistics (the batch file's own when it stores them, as in ADM)
    sfid: GaussianStats      # mixed_6/conv statistics
    weights_id: str
    spatial_NS: Optional[np.ndarray] = None   # float32 (N, 2023) mixed_6/conv activations: sFID's bootstrap


def save_stats(stats: BatchStats, path: PathLike):
    """Write a stats .npz through `atomic_write`."""
    spatial = {} if stats.spatial_NS is None else {SPATIAL_KEY: stats.spatial_NS}
    with atomic_write(path) as f:
        np.savez(f, **{POOL_KEY: stats.pool_ND, 'mu': stats.fid.mu, 'sigma': stats.fid.sigma,
                       'mu_s': stats.sfid.mu, 'sigma_s': stats.sfid.sigma, WEIGHTS_KEY: np.array(stats.weights_id)},
                 **spatial)


def load_stats(path: Path) -> BatchStats:
    """Read and check a stats .npz written by `save_stats`."""
    headers = npz_headers(path)
    missing = [k for k in (POOL_KEY, WEIGHTS_KEY) if k not in headers]
    if missing:
        raise UserError(f'{path}: not a stats file from --save-stats (lacks {", ".join(missing)})')
    shape, dtype = headers[POOL_KEY]
    if len(shape) != 2 or shape[1] != POOL_DIM or shape[0] == 0 or dtype != np.float32:
        raise UserError(f'{path}: {POOL_KEY} must be float32 of shape (N, {POOL_DIM}), found {dtype} {shape}')
    fid, sfid = load_stored_stats(path, headers)
    spatial = headers.get(SPATIAL_KEY)
    if spatial is not None and (spatial[0] != (shape[0], SPATIAL_DIM) or spatial[1] != np.float32):
        raise UserError(f'{path}: {SPATIAL_KEY} must be float32 of shape ({shape[0]}, {SPATIAL_DIM}), found '
                        f'{spatial[1]} {spatial[0]}')
    with np.load(path, allow_pickle=False) as npz:
        return BatchStats(npz[POOL_KEY], fid, sfid, str(npz[WEIGHTS_KEY]),
                          npz[SPATIAL_KEY] if spatial is not None else None)


def cache_path(path: Path, weights_id: str) -> Path:
    """`<batch>.<weights kind>-<hash prefix>.stats.npz` beside the batch file or folder."""
    kind, _, digest = weights_id.rpartition('-')
    return path.parent / f'{path.name}.{kind}-{digest[:WEIGHTS_TAG_CHARS]}{CACHE_SUFFIX}'


def _read_cache(batch: Batch, weights_id: str) -> Optional[BatchStats]:
    """The cached stats of an image batch, or None when absent, older than the batch, or from other weights."""
    file = cache_path(batch.path, weights_id)
    if not file.is_file() or file.stat().st_mtime_ns < batch.images.mtime_ns():
        return None
    try:
        stats = load_stats(file)
    except (UserError, OSError, ValueError) as e:
        log.warning(f'ignoring unreadable cache {file} ({e})')
        return None
    if stats.weights_id != weights_id or len(stats.pool_ND) != len(batch.images):
        return None
    log.info(f'using cached activations {file}')
    return stats


def prepared_batches(images: ImageSource, network: InceptionFeatures,
                     batch_size: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """(size, network input) of each batch, read and prepared one batch ahead in a background thread.

    Decoding and the TF1 resize of batch i+1 overlap the network's run on batch i; errors (a truncated file) surface
    here, in order.
    """
    batches = images.batches(batch_size)

    def load_next() -> Optional[Tuple[int, torch.Tensor]]:
        batch = next(batches, None)
        return None if batch is None else (len(batch), network.prepare(batch))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix='inception-prefetch') as pool:
        pending = pool.submit(load_next)
        while True:
            item = pending.result()
            if item is None:
                return
            pending = pool.submit(load_next)
            yield item


def compute_activations(images: ImageSource, network: InceptionFeatures, batch_size: int,
                        progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Float32 pool_3 (N, 2048) and sFID (N, 2023) activations of every image, with a progress bar."""
    pools, spatials = [], []
    with tqdm(total=len(images), desc=f'Inception {images.path.name}', unit='img', disable=not progress) as bar:
        for size, x_NCHW in prepared_batches(images, network, batch_size):
            pool_ND, spatial_NS = network.run(x_NCHW)
            pools.append(pool_ND.cpu().numpy())
            spatials.append(spatial_NS.cpu().numpy())
            bar.update(size)
    return np.concatenate(pools), np.concatenate(spatials)


def default_batch_size(device: torch.device) -> int:
    """Images per Inception forward when none is asked for: ADM's 64 on a GPU, 16 on a CPU (faster there)."""
    return CPU_BATCH_SIZE if torch.device(device).type == 'cpu' else DEFAULT_BATCH_SIZE


def batch_stats(batch: Batch, network: InceptionFeatures, batch_size: Optional[int] = None, cache: bool = True,
                progress: bool = True, spatial: bool = False) -> BatchStats:
    """Activations and statistics of a batch: from a stats file, from the cache, or by running Inception.

    `batch_size` None: default_batch_size of the network's device. `spatial` keeps the mixed_6/conv activations too
    (sFID's bootstrap needs them; 8 KB per image in the cache)."""
    if batch.images is None:
        stats = load_stats(batch.path)
        if stats.weights_id != network.features_id:
            raise UserError(f'{batch.path}: computed with Inception weights {stats.weights_id[:40]}..., but this run '
                            f'uses {network.features_id[:40]}...; recompute it or pass the matching --inception / '
                            f'--inception-precision')
        return stats
    cached = _read_cache(batch, network.features_id) if cache else None
    if cached is not None and (cached.spatial_NS is not None or not spatial):
        return cached
    log.info(f'computing activations of {batch.path} ({len(batch.images)} images)')
    pool_ND, spatial_NS = compute_activations(batch.images, network, batch_size or default_batch_size(network.device),
                                              progress)
    fid, sfid = batch.stored or (gaussian_stats(pool_ND), gaussian_stats(spatial_NS))
    stats = BatchStats(pool_ND, fid, sfid, network.features_id, spatial_NS if spatial else None)
    if cache:
        try:
            save_stats(stats, cache_path(batch.path, network.features_id))
        except OSError as e:
            log.warning(f'could not write the activation cache beside {batch.path} ({e})')
    return stats


def subset_batch(source: PathLike, rows: Sequence[int], path: PathLike) -> Path:
    """The images `rows` (increasing) of an image-batch .npz as a new .npz, each activation cache of the source carried
    over, so that scoring the subset runs no network. A subset newer than its source is reused."""
    source, path = Path(source), Path(path)
    if path.is_file() and path.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return path
    images = open_batch(source).images
    rows = np.asarray(rows, dtype=np.int64)
    if not isinstance(images, NpzImages):
        raise UserError(f'{source}: a subset needs an image .npz, not a folder or a stats file')
    if not len(rows) or (np.diff(rows) <= 0).any() or rows[0] < 0 or rows[-1] >= len(images):
        raise UserError(f'{source}: subset rows must increase within [0, {len(images)})')
    write_npz_stream(path, _rows_of(images, rows), len(rows), images.shape[1:])
    for cache in sorted(source.parent.glob(glob.escape(source.name) + '.*' + CACHE_SUFFIX)):
        stats = load_stats(cache)
        stale = cache.stat().st_mtime_ns < images.mtime_ns() or len(stats.pool_ND) != len(images)
        if stale or stats.spatial_NS is None:  # the subset's sFID needs the spatial activations
            continue
        pool_ND, spatial_NS = stats.pool_ND[rows], stats.spatial_NS[rows]
        save_stats(BatchStats(pool_ND, gaussian_stats(pool_ND), gaussian_stats(spatial_NS), stats.weights_id,
                              spatial_NS), cache_path(path, stats.weights_id))
    return path


def _rows_of(images: NpzImages, rows: np.ndarray) -> Iterator[np.ndarray]:
    """The images at `rows` (increasing), streamed."""
    keep, start = set(rows.tolist()), 0
    for chunk in images.batches(DEFAULT_BATCH_SIZE):
        yield from (image for i, image in enumerate(chunk, start) if i in keep)
        start += len(chunk)
