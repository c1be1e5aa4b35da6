"""Image files: any PIL mode as 8-bit RGB, uint8 conversion as the official sampler does it, atomic PNG writes,
streaming ADM .npz packing."""
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from utils.fileio import atomic_write

SIXTEEN_BIT_MAX = 65535.0


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    Greyscale and palette images are expanded; 16-bit (and 32-bit integer) greyscale is rescaled rather than clipped;
    transparency is composited onto white (the official loader drops alpha, exposing whatever colour transparent
    pixels happen to store).
    """
    if img.mode.startswith('I') or img.mode == 'F':
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith('I;16') or (img.mode == 'I' and arr.max(initial=0) > 255):
            arr = arr * (255.0 / SIXTEEN_BIT_MAX)
        elif img.mode == 'F' and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        img = img.convert('RGBA')
        white = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img if img.mode == 'RGB' else img.convert('RGB')


class NonFiniteImages(ValueError):
    """Decoded images holding NaN/Inf: they would be written as silently wrong (black) pixels."""


def to_uint8_hwc(img_B3HW: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] -> uint8 (B, H, W, 3), truncating x*255 like the official sampling.py; non-finite values are
    refused (NonFiniteImages) before anything is written."""
    if not bool(torch.isfinite(img_B3HW).all()):
        raise NonFiniteImages('the decoded images hold NaN/Inf values (the model output is not finite, e.g. an fp16 '
                              'overflow: try --dtype fp32); nothing was written for them')
    return img_B3HW.float().mul(255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png_atomic(arr_HW3: np.ndarray, path: Path):
    """Write a PNG through `atomic_write`, so a killed process never leaves a truncated image."""
    with atomic_write(path) as f:
        Image.fromarray(arr_HW3).save(f, format='PNG')


def load_png_rgb(path: Path) -> np.ndarray:
    """A PNG as uint8 (H, W, 3) (any mode converted by `to_rgb`)."""
    with Image.open(path) as im:
        im.load()
        return np.asarray(to_rgb(im))


def write_npz_stream(path: Path, rows: Iterable[np.ndarray], count: int, row_shape, key: str = 'arr_0',
                     dtype=np.uint8):
    """Write `np.savez`-compatible `path` holding `key` of shape (count, *row_shape) one row at a time.

    Memory stays at one row, so 50,000 images of 256x256 (9.8 GB) pack on any machine; the file appears atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
              'shape': (count, *row_shape)}
    written = 0
    with atomic_write(path) as out:
        with zipfile.ZipFile(out, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(f'{key}.npy', mode='w', force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for row in rows:
                    row = np.ascontiguousarray(row, dtype=dtype)
                    if row.shape != tuple(row_shape):
                        raise ValueError(f'row {written} has shape {row.shape}, expected {tuple(row_shape)}')
                    f.write(row.tobytes())
                    written += 1
        if written != count:
            raise ValueError(f'expected {count} rows, got {written}')
