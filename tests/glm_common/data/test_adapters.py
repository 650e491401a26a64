"""torch DataLoader and MindSpore GeneratorDataset yield byte-identical batches for the same seed."""
import numpy as np
import pytest

from glm_common.data import Batcher, build_train_features, load_samples
from tests.conftest import ADGEN_DIR


@pytest.fixture(scope="module")
def feats(tokenizer):
    return build_train_features(load_samples(ADGEN_DIR / "train.json")[:200], tokenizer, "official", 64, 128)


def torch_epochs(loader, n):
    return [[(b["input_ids"].numpy().tobytes(), b["labels"].numpy().tobytes(), tuple(b["input_ids"].shape))
             for b in loader] for _ in range(n)]


def ms_epochs(ds, n):
    it = ds.create_dict_iterator(num_epochs=n, output_numpy=True)
    out = []
    for _ in range(n):
        out.append([(b["input_ids"].tobytes(), b["labels"].tobytes(), tuple(b["input_ids"].shape)) for b in it])
    return out


def reference_epochs(feats, n, **kw):
    out = []
    for e in range(n):
        b = Batcher(feats, 8, seed=5, epoch=e, **kw)
        out.append([(x["input_ids"].tobytes(), x["labels"].tobytes(), tuple(x["input_ids"].shape)) for x in b])
    return out


# one rank of a data-parallel run over two epochs (the unsharded batches of every padding, format and
# feature mode are compared in tests/parity/test_twin_batches.py)
@pytest.mark.parametrize("padding, rank, world_size", [("bucket", 1, 2)])
def test_torch_and_mindspore_batches_are_byte_identical(feats, padding, rank, world_size):
    from mindspore_glm.data import make_dataset
    from torch_glm.data import make_dataloader

    kw = dict(padding=padding, rank=rank, world_size=world_size)
    loader = make_dataloader(feats, 8, seed=5, **kw)
    ds = make_dataset(feats, 8, seed=5, **kw)
    assert ds.get_dataset_size() == len(loader) == len(Batcher(feats, 8, **kw))
    t, m = torch_epochs(loader, 2), ms_epochs(ds, 2)
    assert t == m == reference_epochs(feats, 2, **kw)
    assert t[0] != t[1]                                   # each pass is the next epoch
    if padding == "bucket":
        assert len({s for _, _, s in t[0]}) > 1           # dynamic shapes really vary


def test_torch_workers_keep_the_order(feats):
    from torch_glm.data import make_dataloader

    two = torch_epochs(make_dataloader(feats, 8, seed=5, padding="bucket", num_workers=2), 2)
    assert two == reference_epochs(feats, 2, padding="bucket")


def test_set_epoch_resumes(feats):
    from mindspore_glm.data import make_dataset
    from torch_glm.data import make_dataloader

    loader = make_dataloader(feats, 8, seed=5)
    loader.sampler.set_epoch(3)
    ds = make_dataset(feats, 8, seed=5, epoch=3)
    assert torch_epochs(loader, 1) == ms_epochs(ds, 1) == reference_epochs(feats, 4)[3:]
    ds2 = make_dataset(feats, 8, seed=5)
    ds2.source.set_epoch(2)
    assert ms_epochs(ds2, 1) == reference_epochs(feats, 3)[2:]
    b = next(iter(make_dataloader(feats, 8, seed=5)))
    assert b["input_ids"].dtype.is_floating_point is False and b["input_ids"].shape == (8, 193)
    assert np.all(b["labels"].numpy()[:, :2] == -100)
