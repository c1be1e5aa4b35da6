"""Fashion-MNIST idx -> ImageFolder conversion, on small synthetic idx files."""
import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from utils import fashion_mnist
from utils.cli import UserError
from utils.fileio import read_json_object
from utils.fashion_mnist import CLASS_NAMES, DONE_FILE, prepare, read_idx


def _write_idx(d, prefix, n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(d / f'{prefix}-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 2051, n, 28, 28) + images.tobytes())
    with gzip.open(d / f'{prefix}-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 2049, n) + labels.tobytes())
    return images, labels


def test_prepare_image_folder(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    images, _ = _write_idx(raw, 'train', 30, 0)
    _write_idx(raw, 't10k', 20, 1)
    root = prepare(tmp_path / 'out', size=32, raw_dir=str(raw))
    assert sorted(p.name for p in (root / 'train').iterdir()) == list(CLASS_NAMES)
    assert sum(1 for _ in (root / 'train').rglob('*.png')) == 30 and sum(1 for _ in (root / 'val').rglob('*.png')) == 20
    png = np.asarray(Image.open(root / 'train' / CLASS_NAMES[3] / '00003.png'))
    assert png.shape == (32, 32, 3) and np.array_equal(png[2:30, 2:30, 0], images[3])  # padded, not resampled
    assert png[:2].max() == 0
    mtime = (root / DONE_FILE).stat().st_mtime
    prepare(tmp_path / 'out', size=32, raw_dir=str(raw))  # idempotent: nothing rewritten
    assert (root / DONE_FILE).stat().st_mtime == mtime
    small = prepare(tmp_path / 'small', size=32, raw_dir=str(raw), per_class=1, val_per_class=2)
    assert sum(1 for _ in (small / 'train').rglob('*.png')) == 10
    assert sum(1 for _ in (small / 'val').rglob('*.png')) == 20
    assert not (small / 'test').exists()


def test_prepare_a_test_split_beside_a_small_val_split(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    _write_idx(raw, 'train', 30, 0)
    test_images, _ = _write_idx(raw, 't10k', 40, 1)
    root = prepare(tmp_path / 'out', size=32, raw_dir=str(raw), per_class=2, val_per_class=1, test=True)
    count = {split: sum(1 for _ in (root / split).rglob('*.png')) for split in ('train', 'val', 'test')}
    assert count == {'train': 20, 'val': 10, 'test': 40}
    png = np.asarray(Image.open(root / 'test' / CLASS_NAMES[7] / '00037.png'))
    assert np.array_equal(png[2:30, 2:30, 0], test_images[37])
    assert read_json_object(root / DONE_FILE)['counts'] == count
    mtime = (root / DONE_FILE).stat().st_mtime
    prepare(tmp_path / 'out', size=32, raw_dir=str(raw), per_class=2, val_per_class=1, test=True)
    assert (root / DONE_FILE).stat().st_mtime == mtime
    limited = prepare(tmp_path / 'limited', size=32, raw_dir=str(raw), per_class=1, test=True, test_per_class=3)
    assert sum(1 for _ in (limited / 'test').rglob('*.png')) == 30


def test_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', tmp_path / 'no-debian-package')
    monkeypatch.delenv('FASHION_MNIST_DIR', raising=False)
    with pytest.raises(UserError, match='apt-get install dataset-fashion-mnist'):
        prepare(tmp_path / 'out', size=32)
    with pytest.raises(UserError, match='--raw_dir .* holds no train-images-idx3-ubyte.gz'):
        prepare(tmp_path / 'out', raw_dir=str(tmp_path), size=32)
    bad = tmp_path / 'bad'
    bad.mkdir()
    _write_idx(bad, 'train', 4, 0)
    with gzip.open(bad / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 2049, 3) + bytes(3))
    with pytest.raises(UserError, match='not the label file'):
        read_idx(bad / 'train-images-idx3-ubyte.gz', bad / 'train-labels-idx1-ubyte.gz')
