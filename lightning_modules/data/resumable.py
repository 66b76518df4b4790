"""A training DataLoader whose position in the epoch is saved in checkpoints, for exact mid-epoch resume.

Lightning saves a DataLoader's ``state_dict()`` in the checkpoint when it has one, and
loads it before the next epoch's iterator is created. This loader stores how many
batches of the current epoch it has returned and the seed of the epoch's shuffle.
After a resume it draws the same permutation and skips the batches already trained
on, by index, so no skipped batch is loaded or augmented.

Without this state a run resumed from a mid-epoch checkpoint would start a fresh
shuffle and train on some samples twice and on others not at all in that epoch.
"""

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler


class ResumableRandomSampler(RandomSampler):
    """``RandomSampler`` without replacement that records the seed of each permutation.

    The seed is drawn from torch's global generator as ``RandomSampler`` draws it (torch
    2.x), so an uninterrupted run shuffles exactly as with ``shuffle=True``.
    """

    def __init__(self, data_source: Any) -> None:
        super().__init__(data_source)
        self.seed: int | None = None
        self.resume_seed: int | None = None

    def __iter__(self) -> Iterator[int]:
        if self.resume_seed is not None:
            seed, self.resume_seed = self.resume_seed, None
        else:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class _SkipFirstBatches:
    """The loader's batch sampler, skipping the batches that a resumed epoch already trained on."""

    def __init__(self, loader: "ResumableDataLoader") -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[int]]:
        skip = self.loader.take_pending_skip()
        for index, batch in enumerate(self.loader.batch_sampler):
            if index >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.loader.batch_sampler)


class ResumableDataLoader(DataLoader):
    """DataLoader with ``state_dict``/``load_state_dict``: batches returned this epoch and the shuffle seed.

    Lightning rebuilds the loader with a ``DistributedSampler`` under DDP. That sampler's
    order depends only on its seed and the epoch, so only the batch count is needed there.
    NOTE: mid-epoch resume is tested in one process only, not under DDP.
    """

    # Class attributes, not __init__ arguments: Lightning rebuilds the loader under DDP
    # from the arguments of DataLoader.__init__, which this class keeps unchanged.
    batches_returned = 0
    _pending_skip = 0

    @property
    def _index_sampler(self) -> Any:
        # DataLoader iterators read their batches of indices from this property (torch 2.x).
        if self._auto_collation:
            return _SkipFirstBatches(self)
        return self.sampler

    def take_pending_skip(self) -> int:
        """Return the number of batches to skip in the epoch that starts now, and clear it."""
        skip, self._pending_skip = self._pending_skip, 0
        # A checkpoint written after the epoch's last batch resumes into a new epoch.
        return skip if skip < len(self.batch_sampler) else 0

    def __iter__(self) -> Iterator[Any]:
        pending = self._pending_skip
        resuming = 0 < pending < len(self.batch_sampler)
        self.batches_returned = pending if resuming else 0

        # Creating an iterator draws a worker base seed from torch's global generator. The
        # uninterrupted run drew it at the start of the epoch, before the checkpoint, so
        # on resume the generator is put back and augmentation in the main process
        # continues with the numbers it would have drawn.
        # NOTE: with num_workers > 0 the workers of the resumed epoch get another base
        # seed, so their augmentation differs from the uninterrupted run for that epoch.
        rng_state = torch.get_rng_state() if resuming else None
        iterator = super().__iter__()
        if rng_state is not None:
            torch.set_rng_state(rng_state)

        for batch in iterator:
            self.batches_returned += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: Sampler = self.sampler
        seed = sampler.seed if isinstance(sampler, ResumableRandomSampler) else None
        return {"batches_returned": self.batches_returned, "sampler_seed": seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        batches = int(state_dict["batches_returned"])
        if not 0 < batches < len(self.batch_sampler):
            # A checkpoint at an epoch boundary: the next epoch draws a new shuffle.
            return
        self._pending_skip = batches
        if isinstance(self.sampler, ResumableRandomSampler) and state_dict.get("sampler_seed") is not None:
            self.sampler.resume_seed = int(state_dict["sampler_seed"])
