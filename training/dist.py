"""Distributed helpers: one process or many under torchrun (NCCL on CUDA, gloo on CPU), and the check that every
rank holds bit-identical weights."""
import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

DEFAULT_TIMEOUT_MIN = 30


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = 'auto', timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); a no-op for one process.

    device: 'auto' (CUDA when available), 'cuda' or 'cpu'. A rank that dies makes the others fail their next
    collective within `timeout_min` instead of hanging forever.
    """
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda was asked for but no CUDA GPU is visible')
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device == 'cuda':
        local_rank = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(local_rank)
        dev = torch.device('cuda', local_rank)
    else:
        dev = torch.device('cpu')
    if world > 1 and not tdist.is_initialized():
        backend = 'nccl' if device == 'cuda' else 'gloo'
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min),
                                 **({'device_id': dev} if device == 'cuda' else {}))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def barrier():
    if is_initialized():
        tdist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (identity for one process)."""
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(tdist.get_world_size())
    return t


def all_gather_object(obj) -> list:
    """Every rank's (picklable) object, in rank order; [obj] for one process."""
    if not is_initialized():
        return [obj]
    objs = [None] * tdist.get_world_size()
    tdist.all_gather_object(objs, obj)
    return objs


def all_equal(values) -> bool:
    values = list(values)
    return all(v == values[0] for v in values)


def same_on_all_ranks(obj) -> bool:
    """Whether every rank passed an equal (picklable) object; True for one process."""
    return all_equal(all_gather_object(obj))


def destroy():
    if is_initialized():
        tdist.destroy_process_group()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the bytes of every parameter and buffer, in state-dict order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas(*models: torch.nn.Module) -> str:
    """The weights' digest, after checking that every rank holds bit-identical weights (raises if not)."""
    digest = hashlib.sha256(''.join(weights_digest(m) for m in models).encode()).hexdigest()
    digests = all_gather_object(digest)
    if not all_equal(digests):
        raise RuntimeError(f'ranks hold different weights: {[d[:12] for d in digests]}')
    return digest


def wrap_ddp(module: torch.nn.Module, info: DistInfo, find_unused: bool = False) -> torch.nn.Module:
    """`module` in DistributedDataParallel when this is a multi-process run, else `module` itself."""
    if not info.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[info.local_rank] if info.device.type == 'cuda' else None,
                                   find_unused_parameters=find_unused, forward_sync_buffers=False)
