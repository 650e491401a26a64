"""Batching: padding widths, deterministic shuffling, data-parallel sharding."""
import numpy as np
import pytest

from glm_common.data import Batcher, iterate_batches


def fake_features(n=103, L=40, seed=0):
    """Right-padded rows whose tokens encode (row, position) so a batch row names its source row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, L + 1, size=n)
    ids = np.zeros((n, L), np.int64)
    labels = np.full((n, L), -100, np.int64)
    for i, m in enumerate(lengths):
        ids[i, :m] = 1000 * (i + 1) + np.arange(m)
        labels[i, m // 2:m] = ids[i, m // 2:m]
    return {"input_ids": ids, "labels": labels, "lengths": lengths.astype(np.int64)}


def rows_of(batch):
    return [int(r[0]) // 1000 - 1 for r in batch["input_ids"]]


@pytest.mark.parametrize("padding", ["max_length", "longest", "bucket"])
@pytest.mark.parametrize("world_size, drop", [(1, True), (3, True), (3, False), (4, False)])
def test_shards_are_disjoint_and_cover_the_epoch(padding, world_size, drop):
    f = fake_features()
    B = 5
    per_rank = [[rows_of(b) for b in iterate_batches(f, B, seed=7, epoch=2, rank=r, world_size=world_size,
                                                     drop_remainder=drop, padding=padding)]
                for r in range(world_size)]
    seen = [i for rank in per_rank for b in rank for i in b]
    assert len(seen) == len(set(seen))
    g = B * world_size
    assert len(seen) == (len(f["lengths"]) // g * g if drop else len(f["lengths"]))
    if drop:   # every rank the same number of batches, full and of the same shape at each step
        assert len({len(r) for r in per_rank}) == 1 and all(len(b) == B for r in per_rank for b in r)


def test_batches_carry_the_right_rows_and_widths():
    f = fake_features()
    for padding in ("max_length", "longest", "bucket"):
        b0 = Batcher(f, 4, seed=1, padding=padding, world_size=2, rank=0)
        b1 = Batcher(f, 4, seed=1, padding=padding, world_size=2, rank=1)
        for x, y in zip(b0, b1):
            assert x["input_ids"].shape == y["input_ids"].shape            # same shape on all ranks of a step
            assert x["input_ids"].dtype == np.int64 and x["input_ids"].flags["C_CONTIGUOUS"]
            S = x["input_ids"].shape[1]
            rows = rows_of(x) + rows_of(y)
            longest = f["lengths"][rows].max()
            if padding == "max_length":
                assert S == 40
            else:
                assert S == min(-(-longest // 8) * 8, 40)
            for r, i in enumerate(rows_of(x)):
                np.testing.assert_array_equal(x["input_ids"][r], f["input_ids"][i, :S])
                np.testing.assert_array_equal(x["labels"][r], f["labels"][i, :S])


def test_bucket_boundaries_and_sorting():
    f = fake_features(n=400, L=64)
    b = Batcher(f, 8, seed=3, padding="bucket", bucket_boundaries=[16, 32, 48])
    widths = [x["input_ids"].shape[1] for x in b]
    assert set(widths) <= {16, 32, 48, 64} and len(set(widths)) > 1
    # bucketing keeps lengths in a batch close: far less padding than random batches
    pad_bucket = sum(int((x["input_ids"] == 0).sum()) for x in Batcher(f, 8, seed=3, padding="bucket"))
    pad_longest = sum(int((x["input_ids"] == 0).sum()) for x in Batcher(f, 8, seed=3, padding="longest"))
    assert pad_bucket < pad_longest / 3


def test_shuffle_is_deterministic_and_changes_by_epoch():
    f = fake_features()
    a = [rows_of(x) for x in iterate_batches(f, 4, seed=11, epoch=0)]
    assert a == [rows_of(x) for x in iterate_batches(f, 4, seed=11, epoch=0)]
    assert a != [rows_of(x) for x in iterate_batches(f, 4, seed=11, epoch=1)]
    assert a != [rows_of(x) for x in iterate_batches(f, 4, seed=12, epoch=0)]
    plain = [rows_of(x) for x in iterate_batches(f, 4, shuffle=False, drop_remainder=False)]
    assert [i for b in plain for i in b] == list(range(103))
    b = Batcher(f, 4, seed=11)
    b.set_epoch(1)
    assert [rows_of(x) for x in b] == [rows_of(x) for x in iterate_batches(f, 4, seed=11, epoch=1)]
    assert len(b) == 25


def test_bad_arguments():
    f = fake_features()
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size=2"):
        Batcher(f, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="padding: expected one of"):
        Batcher(f, 4, padding="dynamic")
    with pytest.raises(ValueError, match="make no batch"):
        Batcher(f, 60, world_size=2)
    with pytest.raises(ValueError, match="'lengths'"):
        Batcher({"input_ids": f["input_ids"], "labels": f["labels"]}, 4, padding="bucket")
