"""The token cache of train.py --token_cache: the training set tokenized once (both views when mirroring) into
.npy files keyed by a hash of the tokenizer, the image list and the transform, then read by `TokenDataset`."""
import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data import ImageFolder, build_transform, make_loader, stop_workers
from utils.cli import UserError, one_line
from utils.fileio import create_new, finish_new, read_json_object, write_json_atomic

log = logging.getLogger('viar')


class TokenDataset(Dataset):
    """Cached token pyramids (L,) int64 with their labels; the sample seed picks the view (mirror or not)."""

    def __init__(self, tokens_path: Path, labels_path: Path):
        self.tokens_path = Path(tokens_path)
        self.labels = np.load(labels_path)
        self._tokens = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        if self._tokens is None:  # opened lazily, once per data worker
            self._tokens = np.load(self.tokens_path, mmap_mode='r')
        view = (seed or 0) % self._tokens.shape[1]
        return torch.from_numpy(self._tokens[index, view].astype(np.int64)), int(self.labels[index])


def token_cache_key(vae, images: ImageFolder, image_size: int, mid_reso: float, views: int) -> str:
    """Hash of everything the cached tokens depend on: tokenizer weights, image list and labels, transform."""
    h = hashlib.sha256()
    for k, v in vae.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({'size': image_size, 'mid_reso': mid_reso, 'views': views,
                         'patch_nums': list(vae.config.patch_nums)}).encode())
    for path, label in images.samples:
        h.update(f'{os.path.relpath(path, images.root)}\t{label}\n'.encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def build_token_cache(cache_dir, vae, train: ImageFolder, image_size: int, mid_reso: float, hflip: bool,
                      rank: int, world: int, batch_size: int, workers: int, barrier) -> TokenDataset:
    """Tokenize every training image once (centre crop, plus its mirror with `hflip`) into a memory-mapped file,
    each rank a contiguous shard; reuse the file when nothing it depends on changed.

    The cache trades random-crop augmentation for speed. For several nodes, `cache_dir` must be a shared folder.
    """
    cache_dir = Path(cache_dir)
    views = 2 if hflip else 1
    images = copy.copy(train)
    images.transform = build_transform(image_size, train=False, mid_reso=mid_reso)
    key = token_cache_key(vae, images, image_size, mid_reso, views)
    path, labels, meta = (cache_dir / f'tokens-{key}.{ext}' for ext in ('npy', 'labels.npy', 'json'))
    N, L = len(images), sum(pn * pn for pn in vae.config.patch_nums)
    if meta.is_file():
        check_token_cache(path, labels, meta, (N, views, L), vae.V, len(train.classes))
        log.info('token cache: using %s', path)
        return TokenDataset(path, labels)
    dtype = np.uint16 if vae.V <= np.iinfo(np.uint16).max + 1 else np.int32
    # Fixed names (every rank opens them), created exclusively by rank 0: a planted link is removed, not followed.
    tmp, tmp_labels = cache_dir / f'.tokens-{key}.npy.tmp', cache_dir / f'.tokens-{key}.labels.npy.tmp'
    if rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        create_npy(tmp, np.dtype(dtype), (N, views, L))
        create_npy(tmp_labels, np.dtype(np.int64), (N,))
        log.info('token cache: tokenizing %d images (%d view(s)) into %s', N, views, path)
    barrier()
    arr, arr_labels = np.load(tmp, mmap_mode='r+'), np.load(tmp_labels, mmap_mode='r+')
    lo, hi = N * rank // world, N * (rank + 1) // world
    batches = [[(i, 0) for i in range(s, min(s + batch_size, hi))] for s in range(lo, hi, batch_size)]
    device = next(vae.parameters()).device
    loader = make_loader(images, batches, workers, device.type == 'cuda')
    try:
        for batch, (img, label) in zip(batches, loader):
            pos = [i for i, _ in batch]
            arr_labels[pos] = label.numpy()  # with --skip_bad_images a broken file's slot holds its substitute
            img = img.to(device, non_blocking=True)
            for view in range(views):
                x = img if view == 0 else img.flip(-1)
                arr[pos, view] = torch.cat(vae.img_to_idxBl(x), dim=1).cpu().numpy().astype(dtype)
    finally:
        stop_workers(loader)
    arr.flush()
    arr_labels.flush()
    del arr, arr_labels
    barrier()
    if rank == 0:
        finish_new(tmp, path)
        finish_new(tmp_labels, labels)
        write_json_atomic(meta, {'images': N, 'views': views, 'tokens': L, 'root': str(images.root)})
    barrier()
    return TokenDataset(path, labels)


def create_npy(path: Path, dtype: np.dtype, shape: Tuple[int, ...]):
    """An .npy of zeros (sparse) at the fixed work name `path`, for `np.load(mmap_mode='r+')` to fill in."""
    header = {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False, 'shape': shape}
    with create_new(path) as f:
        np.lib.format.write_array_header_2_0(f, header)
        f.truncate(f.tell() + int(np.prod(shape)) * dtype.itemsize)


def check_token_cache(path: Path, labels: Path, meta: Path, shape: Tuple[int, ...], vocab: int, classes: int):
    """A one-line error naming the file unless the cache holds `shape` token ids below `vocab` and labels below
    `classes` (a truncated, edited or foreign file would train on wrong tokens or fail deep inside a step)."""
    fix = f'remove {path.parent / path.stem}.* to rebuild the cache'
    read_json_object(meta)
    for file, want in ((path, shape), (labels, shape[:1])):
        try:
            arr = np.load(file, mmap_mode='r', allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f'{file}: unreadable token cache ({one_line(e)}); {fix}') from None
        if arr.shape != tuple(want) or arr.dtype.kind not in 'iu':
            raise UserError(f'{file}: token cache of {arr.dtype} {arr.shape}, expected integers of shape '
                            f'{tuple(want)}; {fix}')
        top = classes if file == labels else vocab
        if arr.size and (int(arr.max()) >= top or int(arr.min()) < 0):
            what = 'labels' if file == labels else 'token ids'
            raise UserError(f'{file}: {what} outside [0, {top - 1}] (range {arr.min()}..{arr.max()}); {fix}')
