"""Key/value caches for next-scale sampling, and the two policies for the implicit block.

Every cache is preallocated once per sampling call to the tokens it will hold, so no scale re-concatenates.
`models.trunk.TrunkCaches` lays them out after the trunk's stages.

Implicit-block policies:
* `per_iteration` (official): one cache per iteration index. Iteration t of scale s attends to the t-th iterate of
  every earlier scale that ran more than t iterations. With a constant schedule this equals teacher forcing
  exactly; with other schedules later scales see earlier scales at a different depth than in training.
* `lean`: one cache holding, for every earlier scale, the keys/values of its last iteration. Every iteration of
  the current scale attends to those plus its own current keys/values (written in place, committed when the scale
  ends). Memory is that of one ordinary layer whatever the schedule, and every scale sees the most refined state of
  the earlier ones under any schedule.
"""
from typing import Sequence, Tuple

import torch

KV_POLICIES = ('per_iteration', 'lean')


class KVCache:
    """Preallocated keys/values (B, H, max_len, head_dim) of one attention layer, filled scale after scale."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.len = 0           # committed tokens
        self.pending = 0       # tokens written after `len` but not committed yet
        self.k = None
        self.v = None

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor,
               commit: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write this call's keys/values after the committed ones and return views of everything up to them.

        With commit=False the write is provisional: the next call overwrites it unless `commit()` is called.
        """
        B, H, l, c = k_BHlc.shape
        if self.k is None:
            self.k = k_BHlc.new_empty(B, H, self.max_len, c)
            self.v = v_BHlc.new_empty(B, H, self.max_len, c)
        end = self.len + l
        if end > self.max_len:
            raise RuntimeError(f'KV cache overflow: {end} tokens > preallocated {self.max_len}')
        self.k[:, :, self.len:end] = k_BHlc
        self.v[:, :, self.len:end] = v_BHlc
        if commit:
            self.len, self.pending = end, 0
        else:
            self.pending = l
        return self.k[:, :, :end], self.v[:, :, :end]

    def commit(self):
        """Keep the last provisional write."""
        self.len += self.pending
        self.pending = 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the preallocated capacity)."""
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class PerIterationKVCaches(dict):
    """The official implicit-block cache: one KVCache per iteration index, created on first use."""

    def __init__(self, max_len_per_it: Sequence[int], default_len: int):
        super().__init__()
        self.max_len_per_it, self.default_len = list(max_len_per_it), default_len

    def __missing__(self, it: int) -> KVCache:
        n = self.max_len_per_it[it] if it < len(self.max_len_per_it) else self.default_len
        cache = self[it] = KVCache(n)
        return cache

    def end_scale(self):
        """Nothing to do: every iteration's write was committed to its own cache."""

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.values())


class _ProvisionalWriter:
    """Adapter that makes an attention layer's `append` provisional on a shared cache."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cache.append(k_BHlc, v_BHlc, commit=False)


class LeanKVCache:
    """The lean implicit-block cache: earlier scales' last-iteration keys/values plus the current iteration's."""

    def __init__(self, max_len: int):
        self.cache = KVCache(max_len)
        self._writer = _ProvisionalWriter(self.cache)

    def __getitem__(self, it: int) -> _ProvisionalWriter:
        return self._writer

    def end_scale(self):
        """Commit the keys/values of the scale's last iteration (nothing when the scale ran 0 iterations)."""
        self.cache.commit()

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes
