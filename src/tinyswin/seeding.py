"""Seeds derived from the run's seed: every random stream of a run is a pure function of (seed, keys).

A resumed run recomputes the streams of its next epoch from these alone, so it draws exactly what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import numpy as np

AUGMENT_STREAM = 1  # the per-epoch CPU generator of the augmentation
TORCH_STREAM = 2  # the per-epoch global torch seed (drop path)


def _hash64(*keys: int) -> int:
    """64 bits of numpy's SeedSequence hash of the integer `keys`."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit generator seed that depends only on (seed, epoch), with no collisions between nearby pairs."""
    return _hash64(seed, epoch)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed (valid for `torch.manual_seed`) that depends only on `seed` and `keys`."""
    return _hash64(seed, *keys) >> 1
