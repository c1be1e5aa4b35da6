"""Checkpoint I/O: safe loading (never arbitrary unpickling), strict loading with readable diffs, atomic writes."""
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
import torch.nn as nn

from utils.fileio import atomic_write

PathLike = Union[str, os.PathLike]
# Prefixes that wrappers add to parameter names (DDP, torch.compile).
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
MAX_LISTED_KEYS = 5


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


def _describe(obj: Any) -> str:
    """A short description of an unexpected object found in a checkpoint."""
    if isinstance(obj, Mapping):
        odd = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        return f'a dict whose entry {odd!r} is a {type(obj[odd]).__name__}' if odd is not None else 'a dict'
    return f'a {type(obj).__name__}'


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
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f'{source}: expected a state dict (parameter name -> tensor), found {_describe(sd)}')
    sd = strip_wrapper_prefixes(sd)
    if hasattr(model, 'adapt_state_dict'):
        sd = model.adapt_state_dict(sd)
    problem = describe_mismatch(model, sd)
    if problem:
        raise CheckpointError(f'{source} does not fit {type(model).__name__}: {problem}')
    params = {name for name, _ in model.named_parameters()}  # buffers may hold -inf on purpose (attention masks)
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not bool(
        torch.isfinite(v).all() if k in params else ~torch.isnan(v).any())]
    if nonfinite:
        more = f' (+{len(nonfinite) - MAX_LISTED_KEYS} more)' if len(nonfinite) > MAX_LISTED_KEYS else ''
        raise CheckpointError(f'{source}: weights are not finite: NaN/Inf in {", ".join(nonfinite[:MAX_LISTED_KEYS])}'
                              f'{more}; use an earlier checkpoint')
    if assign:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=assign)


def save_atomic(obj: Any, path: PathLike):
    """torch.save through `atomic_write` (never a half file: a reader sees the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)
        _test_save_delay()


def _test_save_delay():
    """Tests only: VIAR_TEST_SAVE_DELAY=SECONDS holds every checkpoint write open that long, so that a test can kill
    the process in the middle of a save."""
    delay = os.environ.get('VIAR_TEST_SAVE_DELAY')
    if delay:
        time.sleep(float(delay))


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
    from safetensors.torch import save
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().contiguous().clone() for k, v in sd.items()}, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)
