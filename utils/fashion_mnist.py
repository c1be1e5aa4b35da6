"""Fashion-MNIST (70k images, 10 classes, MIT licence) converted into the ImageFolder layout the trainer reads.

    python -m utils.fashion_mnist --out data/fashion_mnist [--size 32]

The original idx files come from Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist), or
from --raw_dir / $FASHION_MNIST_DIR holding train-images-idx3-ubyte.gz etc. Images are 28x28 grey, written as RGB
PNGs zero-padded (black background) to --size; train = the 60k training set, val = the 10k test set. With --test,
the test set is also written as a split of its own (test/), for a benchmark that scores against all of it while val
stays the small split a trainer validates on.
"""
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.cli import ArgumentParser, UserError, int_range, main_entry, writable_dir
from utils.fileio import read_json_object, write_json_atomic
from utils.images import save_png_atomic

DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
# Index-prefixed so that ImageFolder's sorted class order equals the dataset's label ids.
CLASS_NAMES = ('0-tshirt-top', '1-trouser', '2-pullover', '3-dress', '4-coat', '5-sandal', '6-shirt', '7-sneaker',
               '8-bag', '9-ankle-boot')
SPLITS = {'train': 'train', 'val': 't10k', 'test': 't10k'}  # split -> idx file prefix
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
MAX_IDX_BYTES = 2 ** 31  # far above Fashion-MNIST's 47 MB: a header announcing more is malformed
DONE_FILE = 'prepared.json'
MIN_SIZE, MAX_SIZE = 8, 1024  # --size: sides the trainers can use


def find_raw_dir(raw_dir: Optional[str] = None) -> Path:
    """The folder with the four idx .gz files, or a one-line error saying how to get them."""
    if raw_dir is not None and not (Path(raw_dir) / 'train-images-idx3-ubyte.gz').is_file():
        raise UserError(f'--raw_dir {raw_dir} holds no train-images-idx3-ubyte.gz; pass the folder with the four '
                        f'Fashion-MNIST idx .gz files, or leave --raw_dir out to use {DEBIAN_DIR}')
    candidates = [Path(p) for p in (raw_dir, os.environ.get('FASHION_MNIST_DIR')) if p] + [DEBIAN_DIR]
    for d in candidates:
        if (d / 'train-images-idx3-ubyte.gz').is_file():
            return d
    raise UserError('Fashion-MNIST idx files not found; install them with `apt-get install dataset-fashion-mnist`, '
                    'or download train/t10k idx .gz files (e.g. torchvision.datasets.FashionMNIST(download=True) '
                    'when online) and pass --raw_dir, or point the trainer at any ImageFolder')


def _read_gz(path: Path, header: str, item_bytes) -> Tuple[tuple, bytes]:
    """(header fields, payload) of a gzip'd idx file, checked to hold exactly the payload its header announces."""
    if not path.is_file():
        raise UserError(f'{path}: Fashion-MNIST file not found (--raw_dir needs all four idx .gz files)')
    size = struct.calcsize(header)
    try:
        with gzip.open(path, 'rb') as f:
            head = f.read(size)
            if len(head) < size:
                raise UserError(f'{path}: truncated idx file (header of {len(head)} of {size} bytes)')
            fields = struct.unpack(header, head)
            want = item_bytes(fields)
            if not 0 < want <= MAX_IDX_BYTES:
                raise UserError(f'{path}: malformed idx header {fields} (announces {want} bytes)')
            data = f.read(want + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f'{path}: not a readable gzip file ({e})') from None
    if len(data) != want:
        raise UserError(f'{path}: {"truncated" if len(data) < want else "malformed"} idx file (header announces '
                        f'{want} bytes of data, found {"more" if len(data) > want else len(data)})')
    return fields, data


def read_idx(images_gz: Path, labels_gz: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) uint8 labels from a pair of gzip'd idx files, with one-line errors for
    truncated or malformed files."""
    (magic, n, rows, cols), pixels = _read_gz(images_gz, '>IIII', lambda h: h[1] * h[2] * h[3])
    if magic != IMAGES_MAGIC:
        raise UserError(f'{images_gz}: not an idx image file (magic {magic}, expected {IMAGES_MAGIC})')
    (magic, m), raw_labels = _read_gz(labels_gz, '>II', lambda h: h[1])
    if magic != LABELS_MAGIC or m != n:
        raise UserError(f'{labels_gz}: not the label file of {images_gz} (magic {magic}, {m} labels for {n} images)')
    labels = np.frombuffer(raw_labels, dtype=np.uint8)
    if labels.max() >= len(CLASS_NAMES):
        raise UserError(f'{labels_gz}: label {labels.max()} is out of range (Fashion-MNIST has {len(CLASS_NAMES)} '
                        f'classes)')
    return np.frombuffer(pixels, dtype=np.uint8).reshape(n, rows, cols), labels


def to_rgb_padded(img_hw: np.ndarray, size: int) -> np.ndarray:
    """Grey (h, w) -> RGB (size, size, 3), centred on black."""
    h, w = img_hw.shape
    if size < max(h, w):
        return np.asarray(Image.fromarray(img_hw).resize((size, size), Image.LANCZOS).convert('RGB'))
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = img_hw
    return np.repeat(out[:, :, None], 3, axis=2)


def prepare(out_root: Path, size: int = 32, raw_dir: Optional[str] = None, per_class: Optional[int] = None,
            val_per_class: Optional[int] = None, test: bool = False, test_per_class: Optional[int] = None) -> Path:
    """Write out_root/{train,val}/<class>/<index>.png once (at most `per_class` / `val_per_class` images per class of
    the train / val split; all by default), and with `test` also out_root/test/ (at most `test_per_class` per class
    of the test set); later calls return at once. Returns out_root."""
    out_root = Path(out_root)
    done = out_root / DONE_FILE
    limits = {'train': per_class, 'val': val_per_class, **({'test': test_per_class} if test else {})}
    want = {'size': size, 'per_class': per_class, 'val_per_class': val_per_class}
    if test:  # only then, so that a folder prepared without a test split keeps matching its own request
        want.update(test=True, test_per_class=test_per_class)
    if done.is_file() and {k: read_json_object(done).get(k) for k in want} == want:
        return out_root
    raw = find_raw_dir(raw_dir)
    sources = {prefix: read_idx(raw / f'{prefix}-images-idx3-ubyte.gz', raw / f'{prefix}-labels-idx1-ubyte.gz')
               for prefix in sorted(set(SPLITS.values()))}  # all four files checked before anything is written
    counts = {}
    for split, limit in limits.items():
        images, labels = sources[SPLITS[split]]
        for name in CLASS_NAMES:
            (out_root / split / name).mkdir(parents=True, exist_ok=True)
        taken = np.zeros(len(CLASS_NAMES), dtype=int)
        for i in tqdm(range(len(images)), desc=f'fashion-mnist {split}', unit='img', mininterval=1.0):
            c = int(labels[i])
            if limit is not None and taken[c] >= limit:
                continue
            save_png_atomic(to_rgb_padded(images[i], size), out_root / split / CLASS_NAMES[c] / f'{i:05d}.png')
            taken[c] += 1
        counts[split] = int(taken.sum())
    write_json_atomic(done, {**want, 'counts': counts, 'source': str(raw)})
    return out_root


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='data/fashion_mnist', help='ImageFolder root to write')
    p.add_argument('--size', type=int_range(MIN_SIZE, MAX_SIZE), default=32, help='side of the written RGB images')
    p.add_argument('--raw_dir', default=None, help='folder with the idx .gz files (default: the Debian package)')
    p.add_argument('--per_class', type=int_range(1), default=None,
                   help='keep at most this many training images per class')
    p.add_argument('--val_per_class', type=int_range(1), default=None,
                   help='keep at most this many val images per class')
    p.add_argument('--test', action='store_true', help='also write the test set as its own split, test/')
    p.add_argument('--test_per_class', type=int_range(1), default=None,
                   help='with --test: keep at most this many test images per class')
    return p


def main(args):
    writable_dir(args.out, '--out')
    root = prepare(Path(args.out), size=args.size, raw_dir=args.raw_dir, per_class=args.per_class,
                   val_per_class=args.val_per_class, test=args.test, test_per_class=args.test_per_class)
    print(f'Fashion-MNIST ImageFolder ready at {root}: {read_json_object(root / DONE_FILE).get("counts")}')


if __name__ == '__main__':
    main_entry(main, get_parser())
