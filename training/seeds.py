"""Seeds and RNG states: independent seed streams derived from --seed, per-rank seeding, and the RNG states that a
checkpoint stores so that a resumed run continues bit-identically."""
import logging
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from training import dist

log = logging.getLogger('viar')

# Independent seed streams derived from --seed.
STREAM_INIT, STREAM_RANK, STREAM_DATA, STREAM_SJFB, STREAM_SUBNET = 0, 1, 2, 3, 4


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (e.g. seed, stream, rank)."""
    if any(v < 0 for v in values):
        raise ValueError(f'seeds must be >= 0, got {values}')
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_process(seed: int, rank: int):
    """Seed torch (CPU and CUDA), numpy and `random` for this rank."""
    s = mix_seed(seed, STREAM_RANK, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2 ** 32)


# ---- RNG states (stored as tensors and tuples of ints: checkpoints are loaded with weights_only=True) -------------
def rng_state(generators: Dict[str, random.Random]) -> Dict[str, Any]:
    """This process's RNG states: torch CPU/CUDA, `random`, numpy, and the given `random.Random`s."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                       'cached_gaussian': float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    for key, gen in generators.items():
        state[key] = gen.getstate()
    return state


def set_rng_state(state: Dict[str, Any], generators: Dict[str, random.Random]):
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state['torch'])
    random.setstate(_as_tuple(state['python']))
    npy = state['numpy']
    np.random.set_state(('MT19937', npy['keys'].numpy().astype(np.uint32), npy['pos'], npy['has_gauss'],
                         npy['cached_gaussian']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
    for key, gen in generators.items():
        gen.setstate(_as_tuple(state[key]))


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def gather_rng_states(generators: Dict[str, random.Random]) -> List[Dict[str, Any]]:
    """Every rank's RNG states, in rank order (the same list on all ranks)."""
    return dist.all_gather_object(rng_state(generators))


def restore_rng_states(states: Optional[List[Dict[str, Any]]], generators: Dict[str, random.Random], seed: int,
                       rank: int, world: int, step: int):
    """Continue this rank's random streams from a checkpoint.

    If it was written by a different number of ranks, the per-rank streams are re-seeded from (seed, step, rank):
    the run goes on correctly, but not bit-identically. A generator that is one stream shared by every rank (e.g.
    --sjfb_shared_draws), before and after, continues that stream."""
    if states is not None and len(states) == world:
        set_rng_state(states[rank], generators)
        return
    log.warning('checkpoint holds RNG states of %s rank(s), this run has %d: re-seeding the per-rank random streams '
                '(the run continues, but not bit-identically)', 'no' if states is None else len(states), world)
    # Freshly seeded generators are equal on every rank exactly when they are meant to be shared.
    fresh = dist.all_gather_object({key: gen.getstate() for key, gen in generators.items()})
    seed_process(mix_seed(seed, step), rank)
    for i, (key, gen) in enumerate(generators.items()):
        shared_now = world > 1 and dist.all_equal(f[key] for f in fresh)
        saved = [_as_tuple(s[key]) for s in states or [] if key in s]
        shared_before = bool(saved) and dist.all_equal(saved)
        if shared_before and (shared_now or world == 1):
            gen.setstate(saved[0])
        else:
            gen.seed(mix_seed(seed, step, i) if shared_now else mix_seed(seed, step, rank, i))
