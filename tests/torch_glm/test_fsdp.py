"""Sharded training (FSDP2, ``parallel.enable_parallel_optimizer: True``) on 2 CPU ranks under torchrun
(gloo) against one process: the same global batch (2 ranks x 2 rows = one process x 2 rows x 2 accumulated
micro-batches, the same rows), the same initial weights, 20 float32 steps.

Compared against: the unsharded trainer (one process), peft's adapter files, safetensors, DCP's own
``dcp_to_torch_save`` and MindSpore's model (through ``convert/hf_to_ms.py``).

The ``cuda`` tests are the same checks on NCCL with bfloat16 compute; on a node with 2 or more GPUs:

    PYTHONPATH=$PWD python -m pytest -m cuda tests/torch_glm/test_fsdp.py
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import TINY_MODEL
from tests.torch_glm.test_train import run_config

STEPS = 20
# glibc's adaptive mmap threshold keeps the pages of freed tensors in its heap, so the resident set would
# measure the allocator's history; a fixed threshold gives every tensor's pages back when it is freed
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
PROBE = os.path.join(os.path.dirname(__file__), "fsdp_probe.py")


# ---------------------------------------------------------------------------------------- helpers
def torchrun(args, nproc=2, timeout=600, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def write_config(tmp, pet="full", sharded=True, batch=2, accum=1, epochs=5, save_steps=5, lr=1e-3, evals=0,
                 **model):
    """The tiny-model run of tests/torch_glm/test_train.py (16 ADGEN rows, 4 a global batch: 20 steps in
    5 epochs); LoRA and the prefix without dropout (the ranks draw their own dropout masks); ``evals``: evaluate that
    many rows every 10 steps."""
    cfg = run_config(tmp, pet, lr, rows=16, epochs=epochs)
    if evals:
        cfg.update(do_eval=True, eval_step_interval=10)
        cfg["eval_dataset"] = {"data_loader": {"dataset_dir": cfg["train_dataset"]["data_loader"]["dataset_dir"]},
                               "max_source_length": 32, "max_target_length": 8, "num_samples": evals,
                               "batch_size": 2}
    cfg["runner_config"].update(batch_size=batch, gradient_accumulation_steps=accum)
    cfg["train_dataset"]["batch_size"] = batch
    cfg["parallel"] = {"enable_parallel_optimizer": sharded}
    if pet == "lora":
        cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0
    if pet == "ptuning2":
        cfg["model"]["model_config"]["pet_config"]["dropout_prob"] = 0.0
    if save_steps:
        cfg["callbacks"].append({"type": "CheckpointMonitor", "save_checkpoint_steps": save_steps,
                                 "keep_checkpoint_max": 4})
    if model:
        cfg["load_checkpoint"] = ""
        cfg["model"]["model_config"].update(model)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cli(path, nproc, extra=(), timeout=600):
    """Run ``python -m torch_glm.train`` (under torchrun with ``nproc`` > 1); return rank 0's summary."""
    args = ["-m", "torch_glm.train", "--config", str(path), "--no_progress", *extra]
    if nproc > 1:
        proc = torchrun(args, nproc, timeout=timeout)
    else:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def losses(out_dir, key="loss"):
    rows = [json.loads(r) for r in open(os.path.join(out_dir, "loss_log.jsonl"), encoding="utf-8")]
    return {r["step"]: r[key] for r in rows if key in r}


def load_dir(path):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def key_bias(name, config):
    """The key part of ``query_key_value.bias``: its gradient is zero in exact arithmetic (softmax is
    blind to adding ``q . b_k`` to every score of a row), so Adam's normalised update of float32
    round-off is noise of size ``lr`` in any two runs that sum gradients in another order."""
    if not name.endswith("query_key_value.bias"):
        return None
    q = config["num_attention_heads"] * config["kv_channels"]
    return slice(q, q + config["multi_query_group_num"] * config["kv_channels"])


def pair(tmp_path_factory, name, pet, evals=0):
    """One process (batch 2 x 2 accumulated) and 2 sharded ranks (batch 2 each): summaries + output dirs."""
    one = tmp_path_factory.mktemp(f"{name}_one")
    two = tmp_path_factory.mktemp(f"{name}_fsdp")
    s1 = train_cli(write_config(one, pet, sharded=False, batch=2, accum=2, evals=evals), 1)
    s2 = train_cli(write_config(two, pet, sharded=True, batch=2, accum=1, evals=evals), 2)
    return {"one": (s1, one / "out"), "two": (s2, two / "out")}


def assert_same_losses(runs):
    a, b = losses(runs["one"][1]), losses(runs["two"][1])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def assert_half_state(runs):
    """Per rank: parameter + gradient + optimizer-state bytes (local shards) about half the one process's."""
    one = runs["one"][0]["memory"][0]["state_bytes"]
    for rank in runs["two"][0]["memory"]:
        mine = rank["state_bytes"]
        for part in ("params", "grads", "optimizer", "total"):
            assert 0.5 * one[part] <= mine[part] <= 0.52 * one[part], (rank["rank"], part, mine[part], one[part])


# ---------------------------------------------------------------------------------------- full fine-tuning
@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return pair(tmp_path_factory, "full", "full", evals=4)


def test_full_fine_tuning_matches_one_process(full):
    assert_same_losses(full)
    # evaluation runs sharded too (every rank takes part in each forward); rank 0 logs it
    a, b = losses(full["one"][1], "eval_loss"), losses(full["two"][1], "eval_loss")
    assert sorted(a) == sorted(b) == [10, 20]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * a[step], (step, a[step], b[step])
    assert_half_state(full)
    config = json.loads((TINY_MODEL / "config.json").read_text())
    a, b = load_dir(full["one"][1] / "model"), load_dir(full["two"][1] / "model")
    assert sorted(a) == sorted(b) and len(a) == 17
    for name in a:
        diff = (a[name] - b[name]).abs()
        kb = key_bias(name, config)
        if kb is not None:
            assert diff[:kb.start].max() <= 1e-5 and diff[kb.stop:].max() <= 1e-5, name
            continue
        assert diff.max() <= 1e-5, (name, float(diff.max()))
    # the weights did move: the comparison is not of two copies of the start
    start = load_dir(TINY_MODEL)
    assert max(float((start[n] - a[n]).abs().max()) for n in a) > 1e-2


def test_consolidated_checkpoint_loads_in_both_backends(full, tmp_path):
    """The streamed HF directory == DCP's own reading of the last sharded checkpoint; torch's
    ``from_pretrained`` and MindSpore (through ``convert/hf_to_ms.py``) give that model's logits."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from glm_common.config import ChatGLM2Config
    from tests.parity.helpers import BATCH_KEYS, golden, masked_max_diff, ms_tensors
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    out = full["two"][1]
    model_dir = out / "model"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in os.listdir(model_dir) if f.endswith(".safetensors")}
    dcp_to_torch_save(str(out / "checkpoint" / f"glm2_step_{STEPS}"), str(tmp_path / "ref.pt"))
    ref_state = torch.load(tmp_path / "ref.pt", weights_only=False)["model"]
    config = ChatGLM2Config.from_hf(model_dir)
    trained = PTModel(config)
    trained.load_state_dict(ref_state, strict=False)
    loaded = PTModel.from_pretrained(model_dir)
    for name, value in load_dir(model_dir).items():
        assert torch.equal(value, ref_state[name]), name
    g = golden(TINY_MODEL)
    kw = {k: torch.as_tensor(g[b]) for k, b in zip(("input_ids", "attention_mask", "position_ids"), BATCH_KEYS)}
    with torch.no_grad():
        want = trained.eval()(**kw).logits.numpy()
        got = loaded.eval()(**kw).logits.numpy()
    mask = g["batch_attention_mask"]
    assert masked_max_diff(got, want, mask) == 0.0
    ms = pytest.importorskip("mindspore")
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    from convert.hf_to_ms import convert_hf_to_ms
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    ckpt = tmp_path / "trained.ckpt"
    convert_hf_to_ms(str(model_dir), str(ckpt), progress=False)
    msm = MSModel.from_pretrained(str(ckpt), config=config)
    msm.set_train(False)
    ms_logits = msm(*ms_tensors(g, BATCH_KEYS[:3])).asnumpy()
    assert masked_max_diff(ms_logits, want, mask) < 1e-4  # the parity suite's float32 bound


def test_resume_onto_another_rank_count_is_refused(full):
    import torch.distributed as dist
    from glm_common.run_config import RunConfigError
    from torch_glm.parallel import load_checkpoint
    ckpt = str(full["two"][1] / "checkpoint" / f"glm2_step_{STEPS}")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RunConfigError, match=r"written by 2 ranks, this run has 1: resume with 2 ranks") as e:
            load_checkpoint(ckpt, None, None, None)
        assert "\n" not in str(e.value)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_kill_9_after_a_sharded_checkpoint_resumes_the_same_losses(full, tmp_path):
    """kill -9 of the 2-rank run once ``glm2_step_10`` exists; ``--resume`` gives steps 11..20 of the
    uninterrupted run."""
    path = write_config(tmp_path, "full", sharded=True, batch=2, save_steps=10)
    ckpt = tmp_path / "out" / "checkpoint" / "glm2_step_10"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "torch_glm.train", "--config", str(path), "--no_progress"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_dir(), "the run ended before its step-10 checkpoint"
    before = losses(tmp_path / "out")
    assert len(before) < STEPS, "the run finished before it was killed"
    train_cli(path, 2, extra=["--resume"])
    after, want = losses(tmp_path / "out"), losses(full["two"][1])
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert after[step] == want[step], (step, after[step], want[step])


# ---------------------------------------------------------------------------------------- LoRA, P-tuning
@pytest.mark.slow
def test_lora_matches_one_process(tmp_path_factory):
    runs = pair(tmp_path_factory, "lora", "lora")
    assert_same_losses(runs)
    assert_half_state(runs)
    # only the LoRA matrices have optimizer state: 2 float32 moments of each
    n_lora = sum(v.numel() for v in load_dir(runs["one"][1] / "adapter").values())
    assert runs["one"][0]["memory"][0]["state_bytes"]["optimizer"] == 2 * 4 * n_lora
    a, b = load_dir(runs["one"][1] / "adapter"), load_dir(runs["two"][1] / "adapter")
    assert sorted(a) == sorted(b) and any("lora_A" in k for k in a)
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= 1e-5, name
    assert max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 1e-3  # B moved from zero
    from peft import PeftModel
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    PeftModel.from_pretrained(PTModel.from_pretrained(TINY_MODEL), str(runs["two"][1] / "adapter"))


@pytest.mark.slow
def test_ptuning_matches_one_process(tmp_path_factory):
    runs = pair(tmp_path_factory, "ptuning", "ptuning2")
    assert_same_losses(runs)
    a = load_dir(runs["one"][1] / "prefix")
    b = load_dir(runs["two"][1] / "prefix")
    assert sorted(a) == sorted(b) == ["transformer.prefix_encoder.embedding.weight"]
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= 1e-5, name


# ---------------------------------------------------------------------------------------- memory
MEDIUM = dict(hidden_size=512, ffn_hidden_size=1024, num_layers=4, kv_channels=128)


@pytest.mark.slow
def test_peak_memory_per_rank_below_ddp(tmp_path):
    """A model whose weights and Adam states dominate (12.4M parameters), 2 steps: DDP vs FSDP per rank."""
    runs = {}
    for sharded in (False, True):
        tmp = tmp_path / ("fsdp" if sharded else "ddp")
        path = write_config(tmp, "full", sharded=sharded, batch=2, save_steps=0, **MEDIUM)
        runs[sharded] = train_cli(path, 2, extra=["--max_steps", "2"])
    for ddp, fsdp in zip(runs[False]["memory"], runs[True]["memory"]):
        assert fsdp["state_bytes"]["total"] <= 0.52 * ddp["state_bytes"]["total"]
        # the sharded rank saves about half the states (~100 MB); ask for a third of that
        saved = ddp["state_bytes"]["total"] - fsdp["state_bytes"]["total"]
        assert fsdp["peak_bytes"] < ddp["peak_bytes"] - saved / 3, (fsdp, ddp)


@pytest.mark.slow
def test_activation_checkpointing_same_gradients_lower_peak(tmp_path):
    out = {}
    for flag in ("", "--recompute"):
        d = tmp_path / (flag.strip("-") or "plain")
        proc = torchrun([PROBE, "--out", str(d), *([flag] if flag else [])])
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[flag] = (json.loads((d / "probe.json").read_text()), np.load(d / "grads.npz"))
    (plain, gp), (rec, gr) = out[""], out["--recompute"]
    assert rec["loss"] == plain["loss"]
    for name in gp.files:
        scale = float(np.abs(gp[name]).max())
        assert scale > 0 and float(np.abs(gp[name] - gr[name]).max()) <= 1e-6 * scale, name
    for a, b in zip(plain["peak_bytes"], rec["peak_bytes"]):
        assert b < 0.8 * a, (plain["peak_bytes"], rec["peak_bytes"])


# ---------------------------------------------------------------------------------------- CUDA (NCCL, bf16)
def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


need_two_gpus = pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs (NCCL, one rank a GPU)")


def _bf16(tmp, sharded):
    path = write_config(tmp, "full", sharded=sharded, batch=2, save_steps=10)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["model_config"].update(compute_dtype="bfloat16", param_init_type="float32")
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.cuda
def test_cuda_fsdp2_one_gpu(tmp_path):
    """FSDP2 on one GPU (a world of one under torchrun, NCCL): one forward + backward of the sharded probe
    gives the loss and the gradients of the same probe on the CPU (gloo)."""
    out = {}
    for device in ("cpu", "cuda"):
        d = tmp_path / device
        proc = torchrun([PROBE, "--out", str(d), "--device", device, "--layers", "2", "--seq", "128"], nproc=1)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[device] = (json.loads((d / "probe.json").read_text()), np.load(d / "grads.npz"))
    (cpu, gc), (gpu, gg) = out["cpu"], out["cuda"]
    assert np.isfinite(gpu["loss"]) and abs(gpu["loss"] - cpu["loss"]) <= 1e-4 * abs(cpu["loss"])
    assert sorted(gg.files) == sorted(gc.files)
    for name in gc.files:
        scale = float(np.abs(gc[name]).max())
        assert scale > 0 and float(np.abs(gg[name] - gc[name]).max()) <= 1e-3 * scale, name


@pytest.mark.cuda
@need_two_gpus
def test_cuda_bf16_sharded_matches_ddp(tmp_path):
    """NCCL, bfloat16 compute, float32 master weights and reduction: FSDP vs DDP losses, half the states
    per rank, less peak memory, and the consolidated result in float32."""
    ddp = train_cli(_bf16(tmp_path / "ddp", False), 2)
    fsdp = train_cli(_bf16(tmp_path / "fsdp", True), 2)
    a, b = losses(tmp_path / "ddp" / "out"), losses(tmp_path / "fsdp" / "out")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:   # bf16 compute: autocast (DDP) and FSDP's parameter cast round differently
        assert abs(a[step] - b[step]) <= 2e-2 * abs(a[step]), (step, a[step], b[step])
    for d, f in zip(ddp["memory"], fsdp["memory"]):
        assert f["state_bytes"]["total"] <= 0.52 * d["state_bytes"]["total"]
        assert f["peak_bytes"] < d["peak_bytes"]
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    model = PTModel.from_pretrained(tmp_path / "fsdp" / "out" / "model")
    assert model.dtype == torch.float32


@pytest.mark.cuda
@need_two_gpus
def test_cuda_kill_9_resume(tmp_path):
    path = _bf16(tmp_path / "whole", True)
    train_cli(path, 2)
    want = losses(tmp_path / "whole" / "out")
    path = _bf16(tmp_path / "cut", True)
    ckpt = tmp_path / "cut" / "out" / "checkpoint" / "glm2_step_10"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "torch_glm.train", "--config", str(path), "--no_progress"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while not ckpt.is_dir() and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_dir() and len(losses(tmp_path / "cut" / "out")) < STEPS
    train_cli(path, 2, extra=["--resume"])
    after = losses(tmp_path / "cut" / "out")
    for step in range(11, STEPS + 1):
        assert after[step] == pytest.approx(want[step], rel=1e-6), step


@pytest.mark.cuda
@need_two_gpus
def test_cuda_activation_checkpointing(tmp_path):
    out = {}
    for flag in ("", "--recompute"):
        d = tmp_path / (flag.strip("-") or "plain")
        proc = torchrun([PROBE, "--out", str(d), "--device", "cuda", *([flag] if flag else [])])
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[flag] = (json.loads((d / "probe.json").read_text()), np.load(d / "grads.npz"))
    (plain, gp), (rec, gr) = out[""], out["--recompute"]
    for name in gp.files:
        scale = float(np.abs(gp[name]).max())
        assert float(np.abs(gp[name] - gr[name]).max()) <= 1e-6 * scale, name
    for a, b in zip(plain["peak_bytes"], rec["peak_bytes"]):
        assert b < 0.8 * a
