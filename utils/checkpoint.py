"""Checkpoint I/O: safe loading (never arbitrary unpickling), strict loading with readable diffs, atomic writes."""
import os
import pickle
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]
# Prefixes that wrappers add to parameter names (DDP, torch.compile).
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
MAX_LISTED_KEYS = 5
FILE_MODE = 0o666  # before the umask: written files are as readable as any other file the user creates
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, or does not fit the model."""


def load_file(path: PathLike) -> Any:
    """Load a `.pth`/`.pt` with `weights_only=True`, or a `.safetensors`, onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.stat().st_size == 0:
        raise CheckpointError(f'checkpoint is empty (0 bytes): {path}')
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path), device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from None
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only' in str(e).lower() or 'weights_only' in str(e):
            raise CheckpointError(
                f'{path}: refused to load: it contains pickled Python objects beyond tensors and plain containers, '
                f'and unpickling them could run arbitrary code. Re-save it as a plain state dict or safetensors.'
            ) from None
        raise CheckpointError(f'{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0]})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f'{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0]})') from None
    except Exception as e:  # the weights-only unpickler raises KeyError, IndexError, ... on arbitrary bytes
        raise CheckpointError(f'{path}: not a PyTorch checkpoint ({type(e).__name__}: {e})') from None


def strip_wrapper_prefixes(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove DDP/torch.compile prefixes from every key."""
    out = {}
    for k, v in sd.items():
        for prefix in WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def describe_mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    """One line naming missing/unexpected keys and shape mismatches between a model and a state dict ('' if none)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    for what, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shapes)):
        if keys:
            more = f' (+{len(keys) - MAX_LISTED_KEYS} more)' if len(keys) > MAX_LISTED_KEYS else ''
            parts.append(f'{len(keys)} {what}: ' + ', '.join(keys[:MAX_LISTED_KEYS]) + more)
    if not parts:
        return ''
    hint = ''
    if any(k.startswith('implicit_block') for k in unexpected):
        hint = ' -- this is a VIAR checkpoint; build the model with use_implicit=True'
    elif any(k.startswith('implicit_block') for k in missing) and any(k.startswith('blocks.') for k in unexpected):
        hint = ' -- this is an explicit VAR checkpoint; build the model without use_implicit'
    return '; '.join(parts) + hint


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = 'state dict',
                           assign: bool = False):
    """Strictly load `sd` into `model`, or raise a CheckpointError that names what does not fit.

    With `assign=True` the model may live on the meta device: its tensors are replaced by the (float32) checkpoint
    tensors, which skips initialising a large model only to overwrite it.
    """
    sd = strip_wrapper_prefixes(sd)
    if hasattr(model, 'adapt_state_dict'):
        sd = model.adapt_state_dict(sd)
    problem = describe_mismatch(model, sd)
    if problem:
        raise CheckpointError(f'{source} does not fit {type(model).__name__}: {problem}')
    if assign:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=assign)


def temp_name(path: Path) -> str:
    """A fresh hidden temp file beside `path`, `.NAME.XXXXXXXX.tmp`, created empty, with the umask's permissions
    (mkstemp's are owner-only, which would hide checkpoints from collaborators on a shared cluster)."""
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE & ~_UMASK)
    finally:
        os.close(fd)
    return tmp


def fsync_dir(folder: PathLike):
    """Make a rename inside `folder` durable (a crash right after it cannot bring back the old entry)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: PathLike):
    """torch.save to a temp file in the same directory, flush and fsync, then rename over `path` (never a half
    file: a reader sees the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            _test_save_delay()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _test_save_delay():
    """Tests only: VIAR_TEST_SAVE_DELAY=SECONDS holds every checkpoint write open that long, so that a test can kill
    the process in the middle of a save."""
    delay = os.environ.get('VIAR_TEST_SAVE_DELAY')
    if delay:
        time.sleep(float(delay))


def link_atomic(src: PathLike, dst: PathLike):
    """Make `dst` a copy of the finished file `src` without rewriting it: a hard link (a copy where links are not
    supported) under a temp name, renamed over `dst`. Later replacing `src` leaves `dst` untouched."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f'.{dst.name}.{os.getpid()}.tmp')
    if tmp.exists():
        tmp.unlink()
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP and/or torch.compile wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def save_safetensors(sd: Mapping[str, torch.Tensor], path: PathLike, metadata: Dict[str, str] = None):
    """Write a state dict as safetensors, atomically (shared storage is cloned, as safetensors requires)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
