"""Reading evaluation batches: ADM .npz image batches (streamed), PNG folders, and .npz files of stored
statistics (`mu`, `sigma`, `mu_s`, `sigma_s`), checked before any long work."""
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image

from evaluation.inception import POOL_DIM, SPATIAL_DIM
from evaluation.metrics import GaussianStats
from utils.checkpoint import PathLike
from utils.cli import UserError
from utils.images import to_rgb

log = logging.getLogger('viar')

IMAGES_KEY = 'arr_0'
POOL_KEY = 'pool'                            # stats files: float32 pool_3 activations (N, 2048)
STAT_SHAPES = {'mu': (POOL_DIM,), 'sigma': (POOL_DIM, POOL_DIM), 'mu_s': (SPATIAL_DIM,),
               'sigma_s': (SPATIAL_DIM, SPATIAL_DIM)}
COV_TOLERANCE = 1e-4                       # stored covariances: relative asymmetry / negative eigenvalue allowed


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


def load_stored_stats(path: Path, headers: Dict[str, Tuple[Tuple[int, ...], np.dtype]]) -> Tuple[GaussianStats,
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
        stored = load_stored_stats(path, headers) if 'mu' in headers else None
        return Batch(path, NpzImages(path, headers[IMAGES_KEY][0]), stored)
    if POOL_KEY in headers:
        return Batch(path, None)
    raise UserError(f'{path}: has no {IMAGES_KEY} (found: {", ".join(sorted(headers)) or "no arrays"}); '
                    f'expected uint8 images in {IMAGES_KEY} or a stats file from --save-stats')
