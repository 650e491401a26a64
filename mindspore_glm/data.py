"""MindSpore adapter of the shared data pipeline (``glm_common.data``): batches as a ``GeneratorDataset``.

The twin of ``torch_glm/data.py``: both wrap the same :class:`glm_common.data.Batcher`, so for the
same features and arguments they yield byte-identical batches. Rows of the dataset are whole batches
(columns ``input_ids``, ``labels``: int64 ``[B, S]``); do not ``.batch()`` it again. Each pass over the
dataset (each epoch of ``model.train`` or of ``create_*_iterator(num_epochs=...)``) is the next epoch,
starting at ``epoch``; ``dataset.source.set_epoch(e)`` chooses one explicitly (resume).

    ds = make_dataset(feats, batch_size=8, seed=42, rank=get_rank(), world_size=get_group_size())
    for input_ids, labels in ds.create_tuple_iterator(num_epochs=1):   # Tensor int64 [8, S] each
        ...
"""
from __future__ import annotations

import mindspore.dataset as msds

from glm_common.data import Batcher

__all__ = ["BatchSource", "make_dataset"]


class BatchSource:
    """Iterable source of ``GeneratorDataset``: each ``iter()`` yields the batches of the next epoch."""

    def __init__(self, batcher: Batcher, epoch: int = 0):
        self.batcher = batcher
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.batcher)

    def __iter__(self):
        # a generator: the epoch advances when a pass really starts, not when an iterator is made
        epoch = self.epoch
        self.epoch += 1
        columns = self.batcher.columns
        for k in range(len(self.batcher.plan(epoch))):
            b = self.batcher.batch(k, epoch)
            yield tuple(b[c] for c in columns)


def make_dataset(features: dict, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 rank: int = 0, world_size: int = 1, drop_remainder: bool = True, padding: str = "max_length",
                 num_workers: int = 1, **batcher_kwargs) -> msds.GeneratorDataset:
    """A ``GeneratorDataset`` over the batches of ``features`` (``build_train_features`` output).

    Arguments are :class:`glm_common.data.Batcher`'s (``num_workers`` is accepted for the twin's
    signature; batches are built in one thread, in order). The dataset's ``source`` is the
    :class:`BatchSource`.
    """
    batcher = Batcher(features, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                      drop_remainder=drop_remainder, padding=padding, epoch=epoch, **batcher_kwargs)
    source = BatchSource(batcher, epoch)
    ds = msds.GeneratorDataset(source, column_names=list(batcher.columns), shuffle=False, num_parallel_workers=1)
    ds.source = source
    return ds
