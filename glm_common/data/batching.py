"""Batches of train features: padding, deterministic shuffling, data-parallel sharding.

One epoch is planned globally and then split between ranks, so every rank computes the same plan
from ``(seed, epoch)`` without talking to the others:

1. order: ``np.random.default_rng([seed, epoch]).permutation(N)`` (``arange(N)`` without shuffle);
2. ``padding="bucket"``: the order is cut into windows of ``batch_size * world_size * bucket_window``
   rows, each window is sorted by length (stable), so batches hold rows of similar length;
3. the order is cut into GLOBAL batches of ``batch_size * world_size`` rows (with ``drop_remainder``
   the last partial one is dropped); with shuffle and bucketing the global batches are shuffled;
4. rank ``r`` takes the ``r``-th of ``world_size`` contiguous equal parts of every global batch.

So ranks see disjoint rows, their union is the epoch, and all ranks have the same number of batches
of the same shape at every step (keep ``drop_remainder=True`` for data-parallel training: without it
the last global batch is split as evenly as possible and some ranks may get one batch fewer).

Padded length of a batch ``S`` (the same on every rank of a step):

* ``"max_length"``: the static feature length ``L`` (one shape: GRAPH mode on Ascend);
* ``"longest"``/``"bucket"``: the longest row of the global batch rounded up to ``pad_to_multiple_of``,
  or to the smallest of ``bucket_boundaries`` that holds it (a few static shapes), at most ``L``.

Train features are right-padded, so a batch is the rows cut to ``S``:
``{"input_ids": int64 [B, S], "labels": int64 [B, S]}``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["Batcher", "iterate_batches", "PADDINGS"]

PADDINGS = ("max_length", "longest", "bucket")


class Batcher:
    """Deterministic batches of one rank; ``len()`` batches an epoch; ``batch(k, epoch)`` random access.

    ``features``: ``{"input_ids": [N, L], "labels": [N, L], "lengths": [N]}`` from
    ``build_train_features`` (other ``[N, L]`` arrays are batched alongside; ``lengths`` is needed
    for dynamic padding). Iterating yields the batches of ``self.epoch`` (set with :meth:`set_epoch`).
    """

    def __init__(self, features: dict, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_remainder: bool = True,
                 padding: str = "max_length", pad_to_multiple_of: int = 8,
                 bucket_boundaries: Optional[Sequence[int]] = None, bucket_window: int = 64,
                 epoch: int = 0, columns: Sequence[str] = ("input_ids", "labels")):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding: expected one of {', '.join(PADDINGS)}, got {padding!r}")
        for c in columns:
            if c not in features:
                raise ValueError(f"features: no {c!r} array (have {', '.join(features)})")
        self.columns = tuple(columns)
        self.arrays = {c: np.asarray(features[c]) for c in self.columns}
        first = self.arrays[self.columns[0]]
        self.n, self.max_length = first.shape[0], first.shape[1]
        for c, a in self.arrays.items():
            if a.shape != first.shape:
                raise ValueError(f"features: {c!r} has shape {a.shape}, expected {first.shape}")
        if padding != "max_length":
            if "lengths" not in features:
                raise ValueError("features: dynamic padding needs the 'lengths' array of build_train_features")
            self.lengths = np.asarray(features["lengths"], dtype=np.int64)
        else:
            self.lengths = None
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), int(rank)
        self.shuffle, self.seed, self.drop_remainder = bool(shuffle), int(seed), bool(drop_remainder)
        self.padding, self.pad_to_multiple_of = padding, max(1, int(pad_to_multiple_of))
        self.bucket_boundaries = sorted(int(b) for b in bucket_boundaries) if bucket_boundaries else None
        self.bucket_window = max(1, int(bucket_window))
        self.epoch = int(epoch)
        self._plan_cache: tuple = (None, None)
        if len(self) == 0:
            raise ValueError(f"features: {self.n} rows make no batch of {self.batch_size} x world_size "
                             f"{self.world_size} (drop_remainder={self.drop_remainder})")

    # ---------------------------------------------------------------- planning
    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order iteration yields (the shuffle is a function of seed and epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        g = self.batch_size * self.world_size
        full, rest = divmod(self.n, g)
        if rest and not self.drop_remainder:
            # the last global batch is split evenly; this rank gets a part unless it is empty
            return full + (1 if len(np.array_split(np.arange(rest), self.world_size)[self.rank]) else 0)
        return full

    def _global_batches(self, epoch: int) -> list:
        n, g = self.n, self.batch_size * self.world_size
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
        else:
            rng, order = None, np.arange(n)
        if self.padding == "bucket":
            w = g * self.bucket_window
            order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")]
                                    for c in (order[i:i + w] for i in range(0, n, w))])
        batches = [order[i:i + g] for i in range(0, n, g)]
        if self.drop_remainder and batches and len(batches[-1]) < g:
            batches.pop()
        if self.padding == "bucket" and rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _width(self, rows: np.ndarray) -> int:
        if self.padding == "max_length":
            return self.max_length
        longest = int(self.lengths[rows].max()) if len(rows) else 1
        if self.bucket_boundaries:
            for b in self.bucket_boundaries:
                if b >= longest:
                    return min(b, self.max_length)
            return self.max_length
        m = self.pad_to_multiple_of
        return min(-(-longest // m) * m, self.max_length)

    def plan(self, epoch: Optional[int] = None) -> list:
        """``[(row indices of this rank, padded length S), ...]`` for one epoch."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        out = []
        for gb in self._global_batches(epoch):
            part = np.array_split(gb, self.world_size)[self.rank]
            if len(part):
                out.append((part, self._width(gb)))
        self._plan_cache = (epoch, out)
        return out

    # ---------------------------------------------------------------- batches
    def batch(self, k: int, epoch: Optional[int] = None) -> dict:
        """Batch ``k`` of ``epoch``: ``{column: int64 [B, S]}`` (C-contiguous copies)."""
        rows, width = self.plan(epoch)[k]
        return {c: np.ascontiguousarray(self.arrays[c][rows, :width]) for c in self.columns}

    def __iter__(self):
        epoch = self.epoch
        for k in range(len(self.plan(epoch))):
            yield self.batch(k, epoch)


def iterate_batches(features: dict, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                    rank: int = 0, world_size: int = 1, drop_remainder: bool = True,
                    padding: str = "max_length", **kwargs):
    """Yield the batches of one epoch of one rank (see :class:`Batcher` for the arguments)."""
    return iter(Batcher(features, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                        world_size=world_size, drop_remainder=drop_remainder, padding=padding, **kwargs))
