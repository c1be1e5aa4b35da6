"""Image files: uint8 conversion as the official sampler does it, atomic PNG writes, streaming ADM .npz packing."""
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image


def to_uint8_hwc(img_B3HW: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] -> uint8 (B, H, W, 3), truncating x*255 like the official sampling.py."""
    return img_B3HW.float().mul(255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    return tmp


def save_png_atomic(arr_HW3: np.ndarray, path: Path):
    """Write a PNG via a temp file and rename, so a killed process never leaves a truncated image."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        Image.fromarray(arr_HW3).save(tmp, format='PNG')
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_png_rgb(path: Path) -> np.ndarray:
    """A PNG as uint8 (H, W, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


def write_npz_stream(path: Path, rows: Iterable[np.ndarray], count: int, row_shape, key: str = 'arr_0',
                     dtype=np.uint8):
    """Write `np.savez`-compatible `path` holding `key` of shape (count, *row_shape) one row at a time.

    Memory stays at one row, so 50,000 images of 256x256 (9.8 GB) pack on any machine; the file appears atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    header = {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
              'shape': (count, *row_shape)}
    written = 0
    try:
        with zipfile.ZipFile(tmp, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
