"""Training data: ImageFolder datasets with the official transforms, and a resumable distributed batch sampler
(the on-disk cache of token pyramids is training/token_cache.py).

Every sample is requested as (index, seed): the seed fixes its random augmentation, and the sampler derives it from
(--seed, epoch, position in the epoch). What a step sees therefore depends neither on the number of ranks or data
workers nor on where a run was resumed.
"""
import logging
import math
import os
import signal
import stat
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from training.seeds import STREAM_DATA, mix_seed
from utils.cli import UserError, one_line
from utils.images import to_rgb

log = logging.getLogger('viar')

DEFAULT_MID_RESO = 1.125    # official: resize the shorter side to round(1.125 * size), then crop
MAX_CONSECUTIVE_BAD = 100   # --skip_bad_images gives up after this many unreadable files in a row
SAMPLE_SEED_HIGH = 2 ** 62


class BadImageError(UserError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, message: str):
        # DataLoader workers re-raise with the worker's traceback in the message: keep the original line only.
        marker = f'{type(self).__name__}: '
        if 'Traceback' in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


# ---- images ---------------------------------------------------------------------------------------------------------
def load_rgb(path: str) -> Image.Image:
    """Decode an image file completely (so a truncated file fails here) and convert it to RGB."""
    try:
        # O_NONBLOCK: a FIFO put in place of an image must fail here, not block the reader forever
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), 'rb') as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError('not a regular file')
            img = Image.open(f)
            img.load()
            return to_rgb(img)
    except Exception as e:  # any failure to decode one file is reported as that file's problem
        raise BadImageError(f'cannot read image {path}: {one_line(e)}') from None


class ToPlusMinusOne:
    """[0, 1] -> [-1, 1], the tokenizer's input range (a class, not a lambda, so data workers can pickle it)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(2).sub_(1)


def build_transform(image_size: int, train: bool, mid_reso: float = DEFAULT_MID_RESO, hflip: bool = False):
    """Official transforms: shorter side to round(mid_reso * size) with LANCZOS, random (train) or centre (val) crop,
    values in [-1, 1]; an optional horizontal flip comes first (train only)."""
    ops = [T.RandomHorizontalFlip()] if hflip and train else []
    ops += [T.Resize(round(mid_reso * image_size), interpolation=T.InterpolationMode.LANCZOS),
            T.RandomCrop(image_size) if train else T.CenterCrop(image_size),
            T.ToTensor(), ToPlusMinusOne()]
    return T.Compose(ops)


def image_files(folder: Path, seen: set, skipped: Counter) -> List[str]:
    """Image files under `folder`, sorted, each file once: symbolic links are followed, but a folder or file reached
    twice (a link loop, a second link to it) is skipped, and so are non-regular files such as FIFOs, which would block
    the reader forever. `seen` holds the folders (the data root and every class folder from the start) and files met
    so far, as ('dir', device, inode) and (device, inode); `skipped` counts what was left out, by reason."""
    found, stack = [], [folder]
    while stack:
        current = stack.pop()
        try:
            st = current.stat()
            entries = sorted(os.scandir(current), key=lambda e: e.name, reverse=True)
        except OSError:
            skipped['unreadable folder(s)'] += 1
            continue
        if current != folder and ('dir', st.st_dev, st.st_ino) in seen:
            skipped['folder(s) reached twice through symbolic links'] += 1
            continue
        seen.add(('dir', st.st_dev, st.st_ino))
        for entry in entries:
            path = Path(entry.path)
            try:
                st = path.stat()
            except OSError:
                skipped['broken link(s) or unreadable entries'] += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif not entry.name.lower().endswith(IMG_EXTENSIONS):
                continue
            elif not stat.S_ISREG(st.st_mode):
                skipped['image name(s) that are not regular files (FIFO, device, socket)'] += 1
            elif (st.st_dev, st.st_ino) in seen:
                skipped['image(s) reached twice through links'] += 1
            else:
                seen.add((st.st_dev, st.st_ino))
                found.append(str(path))
    return sorted(found, key=lambda p: os.path.split(p))  # torchvision's order: by folder, then by name


class ImageFolder(DatasetFolder):
    """`root/<class>/<image>` with one-line errors for missing or empty folders, optional skipping of unreadable
    files, and per-sample seeded augmentation. `classes` fixes the class list (validation uses the training one)."""

    def __init__(self, root, transform, classes: Optional[Sequence[str]] = None, skip_bad: bool = False):
        self._given_classes = None if classes is None else list(classes)
        if not Path(root).is_dir():
            raise UserError(f'data folder not found: {root}')
        super().__init__(str(root), loader=load_rgb, extensions=IMG_EXTENSIONS, transform=transform, allow_empty=True)
        self.skip_bad = skip_bad
        self._reported_bad = set()

    def find_classes(self, directory):
        found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        if self._given_classes is None:
            if not found:
                raise UserError(f'{directory} holds no class folders (expected {directory}/<class>/<image>)')
            classes = found
        else:
            unknown = sorted(set(found) - set(self._given_classes))
            if unknown:
                raise UserError(f'{directory} has class folders the training set lacks: {unknown[:5]}')
            classes = self._given_classes
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=True):
        samples, skipped = [], Counter()
        # The root and every class folder count as visited: a link back to them from inside a class is skipped.
        roots = [Path(directory), *(Path(directory) / name for name in class_to_idx)]
        seen = {('dir', st.st_dev, st.st_ino) for st in (r.stat() for r in roots if r.is_dir())}
        for name in sorted(class_to_idx):
            folder = Path(directory) / name
            if folder.is_dir():
                samples += [(path, class_to_idx[name]) for path in image_files(folder, seen, skipped)]
        for why, n in sorted(skipped.items()):
            log.warning('%s: skipped %d %s', directory, n, why)
        if self._given_classes is None:
            counts = Counter(label for _, label in samples)
            empty = [c for c, i in class_to_idx.items() if counts[i] == 0]
            if empty:
                more = f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''
                raise UserError(f'class folder {Path(directory) / empty[0]} has no images{more}; '
                                f'accepted extensions: {" ".join(IMG_EXTENSIONS)}')
        if not samples:
            raise UserError(f'no images under {directory}')
        return samples

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        img, target = self._load(index)
        if seed is None:
            return self.transform(img), target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), target

    def _load(self, index: int) -> Tuple[Image.Image, int]:
        """The image at `index`; with skip_bad, the next readable one (and its label) instead of a broken file."""
        for attempt in range(MAX_CONSECUTIVE_BAD):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                return load_rgb(path), target
            except BadImageError as e:
                if not self.skip_bad:
                    raise BadImageError(f'{e} (pass --skip_bad_images to skip such files)') from None
                if path not in self._reported_bad:
                    self._reported_bad.add(path)
                    log.warning('%s; skipped (--skip_bad_images): using the next image instead', e)
        raise UserError(f'{MAX_CONSECUTIVE_BAD} unreadable images in a row from {self.samples[index][0]} on')


def build_datasets(data_path, image_size: int, mid_reso: float = DEFAULT_MID_RESO, hflip: bool = False,
                   skip_bad: bool = False) -> Tuple[ImageFolder, Optional[ImageFolder]]:
    """(train, val or None) from `data_path/train/<class>/...` and the optional `data_path/val/<class>/...`."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f'--data_path {root} does not exist')
    if not (root / 'train').is_dir():
        raise UserError(f'{root} has no train/ folder (expected {root}/train/<class>/<image> and optionally '
                        f'{root}/val/<class>/<image>)')
    train = ImageFolder(root / 'train', build_transform(image_size, True, mid_reso, hflip), skip_bad=skip_bad)
    val = None
    if (root / 'val').is_dir():
        val = ImageFolder(root / 'val', build_transform(image_size, False, mid_reso), classes=train.classes,
                          skip_bad=skip_bad)
    return train, val


# ---- sampling -------------------------------------------------------------------------------------------------------
class DistributedBatchSampler:
    """This rank's batches of (index, sample seed) for one epoch at a time; resumable mid-epoch.

    Each epoch draws a permutation from (seed, epoch), pads it with its own head to whole global batches (as the
    official sampler does; `pad=False` keeps a partial last batch instead, for evaluation), and gives rank r the r-th
    of `world` equal parts of each global batch -- so every step sees the same images whatever the number of ranks.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, pad: bool = True):
        if num_samples < 1 or global_batch < 1 or global_batch % world:
            raise ValueError(f'bad sampler sizes: {num_samples} samples, global batch {global_batch}, world {world}')
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world, self.local_batch = rank, world, global_batch // world
        self.seed, self.shuffle, self.pad = seed, shuffle, pad
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.global_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Select the epoch (its shuffle) and the global batch to start from."""
        self.epoch, self.start_batch = epoch, start_batch

    def _epoch_order(self) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, STREAM_DATA, self.epoch))
        n = self.num_samples
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.pad:
            total = self.batches_per_epoch * self.global_batch
            order = order.repeat(math.ceil(total / n))[:total]
        seeds = torch.randint(0, SAMPLE_SEED_HIGH, (len(order),), generator=g)
        return order, seeds

    def _bounds(self, k: int) -> Tuple[int, int]:
        lo = k * self.global_batch + self.rank * self.local_batch
        return lo, lo + self.local_batch

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        order, seeds = self._epoch_order()
        for k in range(self.start_batch, self.batches_per_epoch):
            lo, hi = self._bounds(k)
            batch = list(zip(order[lo:hi].tolist(), seeds[lo:hi].tolist()))
            if batch:
                yield batch

    def __len__(self) -> int:
        n = self.batches_per_epoch * self.global_batch if self.pad else self.num_samples
        return sum(1 for k in range(self.start_batch, self.batches_per_epoch) if self._bounds(k)[0] < n)


def ignore_stop_signals(worker_id: int):
    """Data workers ignore SIGINT/SIGTERM (Ctrl-C or a scheduler signals the whole process group): the main process
    finishes its step, saves, and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(*loaders: Optional[DataLoader]):
    """Shut the persistent worker processes of these loaders down now, through their queues.

    They ignore SIGTERM (`ignore_stop_signals`), so they must not be left to the interpreter's exit: multiprocessing
    would terminate them with SIGTERM and then wait for them forever (a loader kept alive by an exception's traceback
    did exactly that).
    """
    for loader in loaders:
        it = getattr(loader, '_iterator', None)
        if it is not None:
            it._shutdown_workers()
            loader._iterator = None


def make_loader(dataset: Dataset, batch_sampler, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over `batch_sampler`; its own generator keeps the global torch RNG untouched (resume exactness)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, generator=torch.Generator(), worker_init_fn=ignore_stop_signals)


VAL_BATCH_FACTOR = 1.5  # validation batch = 1.5 x the per-rank training batch (official)


def build_loaders(train: Dataset, val: Optional[Dataset], local_batch: int, rank: int, world: int, seed: int,
                  workers: int, pin_memory: bool):
    """(training sampler, training loader, validation loader or None) for this rank."""
    sampler = DistributedBatchSampler(len(train), local_batch * world, rank, world, seed)
    loader = make_loader(train, sampler, workers, pin_memory)
    val_loader = None
    if val is not None:
        val_batch = max(1, round(local_batch * VAL_BATCH_FACTOR)) * world
        val_sampler = DistributedBatchSampler(len(val), val_batch, rank, world, seed, shuffle=False, pad=False)
        val_loader = make_loader(val, val_sampler, workers, pin_memory)
    return sampler, loader, val_loader
