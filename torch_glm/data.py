"""PyTorch adapter of the shared data pipeline (``glm_common.data``): batches as a ``DataLoader``.

The twin of ``mindspore_glm/data.py``: both wrap the same :class:`glm_common.data.Batcher`, so for the
same features and arguments they yield byte-identical batches. Each full pass over the loader is the
next epoch (starting at ``epoch``); ``loader.sampler.set_epoch(e)`` chooses one explicitly (resume).

    loader = make_dataloader(feats, batch_size=8, seed=42, rank=rank, world_size=world_size)
    for batch in loader:        # {"input_ids": LongTensor [8, S], "labels": LongTensor [8, S]}
        loss = model(**batch).loss
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from glm_common.data import Batcher

__all__ = ["BatchDataset", "EpochSampler", "make_dataset", "make_dataloader"]


class BatchDataset(Dataset):
    """Map-style dataset whose item ``(epoch, k)`` (or ``k``: the batcher's epoch) is batch ``k`` as tensors."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def __len__(self) -> int:
        return len(self.batcher)

    def __getitem__(self, index) -> dict:
        epoch, k = index if isinstance(index, tuple) else (self.batcher.epoch, index)
        return {c: torch.from_numpy(a) for c, a in self.batcher.batch(int(k), epoch).items()}


class EpochSampler(Sampler):
    """Yields ``(epoch, k)`` for every batch of an epoch; every new iteration moves to the next epoch."""

    def __init__(self, batcher: Batcher, epoch: int = 0):
        self.batcher = batcher
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.batcher)

    def __iter__(self):
        # a generator: the epoch advances only when the iteration is really consumed (the multi-worker
        # DataLoader creates and drops one sampler iterator before the one it uses)
        epoch = self.epoch
        self.epoch += 1
        for k in range(len(self.batcher.plan(epoch))):
            yield epoch, k


def make_dataset(features: dict, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 rank: int = 0, world_size: int = 1, drop_remainder: bool = True, padding: str = "max_length",
                 num_workers: int = 0, **batcher_kwargs) -> DataLoader:
    """A ``DataLoader`` over the batches of ``features`` (``build_train_features`` output).

    Arguments are :class:`glm_common.data.Batcher`'s; ``num_workers`` builds batches in worker processes
    (the order does not change). Yields ``{"input_ids": int64 [B, S], "labels": int64 [B, S]}``.
    """
    batcher = Batcher(features, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                      drop_remainder=drop_remainder, padding=padding, epoch=epoch, **batcher_kwargs)
    return DataLoader(BatchDataset(batcher), batch_size=None, sampler=EpochSampler(batcher, epoch),
                      num_workers=num_workers)


#: the torch name for the same thing
make_dataloader = make_dataset
