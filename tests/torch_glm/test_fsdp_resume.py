"""Resume from sharded (FSDP2 / DCP) checkpoints without running any pickle's code, in one process (a
1-rank gloo group): a planted ``trainer_state.pt``, ``.metadata`` or pickled shard item, and damaged DCP
files, against the real ``torch.distributed.checkpoint`` and the real training state (optimizer, RNG)."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from glm_common.resume import CheckpointInvalid
from glm_common.run_config import RunConfigError
from tests.torch_glm.test_resume import _Planted


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _trainer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    return model, opt, sched


def _write(root, step, model, opt, sched, evil_item=None):
    """A checkpoint as torch_glm.parallel.save_checkpoint writes it (its DCP call and trainer state)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch_glm.parallel import _state_options
    from torch_glm.resume import rng_state, save_trainer_state
    path = root / f"glm2_step_{step}"
    path.mkdir(parents=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=_state_options())
    if evil_item is not None:
        optim_sd["param_groups"][0]["lr"] = evil_item    # a non-tensor item: pickled into the shard by DCP
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    save_trainer_state(str(path), None, sched, step, rngs=[rng_state()], epoch=0, batch_in_epoch=step, format="dcp")
    return path


def _train(model, opt, sched, steps):
    for _ in range(steps):
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.fixture
def two_steps(group, tmp_path):
    model, opt, sched = _trainer()
    root = tmp_path / "checkpoint"
    _train(model, opt, sched, 1)
    _write(root, 1, model, opt, sched)
    _train(model, opt, sched, 1)
    random.seed(7)
    np.random.seed(7)
    _write(root, 2, model, opt, sched)
    want = ({k: v.clone() for k, v in model.state_dict().items()}, torch.randn(3), np.random.rand(), random.random(),
            sched.state_dict()["last_epoch"])
    return root, want


def test_sharded_checkpoint_resumes_weights_optimizer_scheduler_and_rng(two_steps, capsys):
    from torch_glm.parallel import load_checkpoint
    from torch_glm.resume import resume_checkpoint
    root, (weights, t_draw, np_draw, py_draw, last_epoch) = two_steps
    path = resume_checkpoint(str(root), "glm2", 0, 1)
    assert path == str(root / "glm2_step_2")
    model, opt, sched = _trainer(seed=1)
    state = load_checkpoint(path, model, opt, sched)
    assert (state["step"], state["world_size"], state["rank_id"], state["batch_in_epoch"]) == (2, 1, 0, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert sched.state_dict()["last_epoch"] == last_epoch
    assert torch.equal(torch.randn(3), t_draw) and np.random.rand() == np_draw and random.random() == py_draw


def test_planted_trainer_state_pickle_is_never_loaded(two_steps, tmp_path, capsys):
    from torch_glm.parallel import load_checkpoint
    from torch_glm.resume import resume_checkpoint
    root, _ = two_steps
    marker = tmp_path / "pwned"
    latest = root / "glm2_step_2"
    (latest / "trainer_state.json").unlink()                       # the old pickled layout ...
    for step in (1, 2):                                             # ... and a pickle beside a complete one
        torch.save(_Planted(marker), root / f"glm2_step_{step}" / "trainer_state.pt")
    capsys.readouterr()
    path = resume_checkpoint(str(root), "glm2", 0, 1)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {latest}: no trainer_state.json; its trainer_state.pt is a pickle" in err, err
    assert path == str(root / "glm2_step_1")
    model, opt, sched = _trainer(seed=1)
    assert load_checkpoint(path, model, opt, sched)["step"] == 1
    with pytest.raises(RunConfigError, match="no trainer_state.json"):
        load_checkpoint(str(latest), model, opt, sched)
    assert not marker.exists(), "a pickle in a sharded checkpoint was executed"


def test_planted_dcp_metadata_pickle_is_never_loaded(two_steps, tmp_path, capsys):
    from torch_glm.parallel import load_checkpoint
    from torch_glm.resume import resume_checkpoint
    root, _ = two_steps
    marker = tmp_path / "pwned"
    latest = root / "glm2_step_2"
    (latest / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))   # DCP's metadata is a plain pickle
    capsys.readouterr()
    assert resume_checkpoint(str(root), "glm2", 0, 1) == str(root / "glm2_step_1")
    err = capsys.readouterr().err
    assert f"skipping checkpoint {latest}: .metadata: refers to builtins.exec, not DCP metadata" in err, err
    model, opt, sched = _trainer(seed=1)
    with pytest.raises(RunConfigError, match=r"\.metadata: refers to builtins\.exec"):
        load_checkpoint(str(latest), model, opt, sched)
    assert not marker.exists(), "a pickle in .metadata was executed"


def test_pickled_shard_item_is_never_run(group, tmp_path):
    from torch_glm.parallel import load_checkpoint
    marker = tmp_path / "pwned"
    model, opt, sched = _trainer()
    _train(model, opt, sched, 1)
    path = _write(tmp_path / "checkpoint", 1, model, opt, sched, evil_item=_Planted(marker))
    model, opt, sched = _trainer(seed=1)
    with pytest.raises(RunConfigError, match=r"its DCP shards do not load \(Weights only load failed") as e:
        load_checkpoint(str(path), model, opt, sched)
    assert "\n" not in str(e.value)
    assert not marker.exists(), "a pickled item of a DCP shard was executed"


@pytest.mark.parametrize("damage", ["zero-length metadata", "truncated shard", "another world size"])
def test_damaged_sharded_checkpoint_is_skipped_with_one_line(two_steps, capsys, damage):
    from torch_glm.resume import resume_checkpoint
    root, _ = two_steps
    latest = root / "glm2_step_2"
    if damage == "zero-length metadata":
        (latest / ".metadata").write_bytes(b"")
        what = ".metadata: empty file (0 bytes)"
    elif damage == "truncated shard":
        shard = latest / "__0_0.distcp"
        size = shard.stat().st_size
        shard.write_bytes(shard.read_bytes()[:size // 2])
        what = f"__0_0.distcp: cut short ({size // 2} bytes, .metadata says {size})"
    else:
        text = (latest / "trainer_state.json").read_text().replace('"world_size": 1', '"world_size": 2')
        (latest / "trainer_state.json").write_text(text)
        what = "written by a run of 2 rank(s), this run has 1"
    capsys.readouterr()
    assert resume_checkpoint(str(root), "glm2", 0, 1) == str(root / "glm2_step_1")
    err = capsys.readouterr().err
    assert f"skipping checkpoint {latest}: {what}" in err, err
    assert len([ln for ln in err.splitlines() if "skipping" in ln]) == 1


def test_verify_needs_every_ranks_rng(two_steps):
    from torch_glm.resume import verify_checkpoint
    root, _ = two_steps
    meta = verify_checkpoint(str(root / "glm2_step_2"), 2, 1)
    assert meta["format"] == "dcp" and len(meta["rng"]) == 1
    with pytest.raises(CheckpointInvalid, match="written by a run of 1 rank"):
        verify_checkpoint(str(root / "glm2_step_2"), 2, 2)
    assert not os.path.exists(root / "glm2_step_2" / "trainer_state.pt")
