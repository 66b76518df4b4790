"""Seeds derived from a user's seed for each stream a run draws: a stage, a shard, a batch.

Adding an offset (``seed + index``) makes the streams of neighbouring seeds overlap. Stage
1 of the run with seed 0 would draw the numbers of stage 0 of the run with seed 1, and two
"independent" seeds would share most of their noise. A SeedSequence hashes the stream,
the number of keys and the keys together, so different calls get unrelated seeds (two of
them collide with probability 2**-32).
"""

import numpy as np

# One constant per kind of stream, so a pipeline stage and a reflow shard with equal keys
# still get different seeds.
STAGE_STREAM = 1
SHARD_STREAM = 2
STEP_NOISE_STREAM = 3


def derive_seed(stream: int, *keys: int) -> int:
    """Return a seed in [0, 2**32) for ``stream`` (a constant of this module) and ``keys``.

    The keys are non-negative integers, such as the run's seed and a stage or batch index.
    The number of keys is hashed too, because a SeedSequence pads its input with zeros and
    would otherwise give ``(7,)`` and ``(7, 0)`` the same seed. The range fits both
    ``torch.Generator.manual_seed`` and ``lightning.seed_everything``.
    """
    if not keys:
        raise ValueError("derive_seed needs at least one key, such as the run's seed")
    if stream < 0 or any(key < 0 for key in keys):
        raise ValueError(f"seed keys must be >= 0, got stream {stream} and keys {keys}; choose seed=0 or above")
    entropy = [stream, len(keys), *keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])
