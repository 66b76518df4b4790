"""Seeds derived from a user's seed for each stream a run draws: a stage, a shard, a batch.

Adding an offset (``seed + index``) makes the streams of neighbouring seeds overlap. Stage
1 of the run with seed 0 would draw the numbers of stage 0 of the run with seed 1, and two
"independent" seeds would share most of their noise. A SeedSequence hashes all the keys
together, so different key tuples get unrelated streams (two of them collide with
probability 2**-32).
"""

import numpy as np


def derive_seed(*keys: int) -> int:
    """Return a seed in [0, 2**32) for the stream named by ``keys`` (non-negative integers).

    The range fits both ``torch.Generator.manual_seed`` and ``lightning.seed_everything``.
    """
    if not keys:
        raise ValueError("derive_seed needs at least one key, such as the run's seed")
    if any(key < 0 for key in keys):
        raise ValueError(f"seed keys must be >= 0, got {keys}; choose seed=0 or above")
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint32)[0])
