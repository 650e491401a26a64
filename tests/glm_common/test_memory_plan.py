"""The memory plan (glm_common/memory_plan.py; python -m mindspore_glm.plan / torch_glm.plan).

Against published measurements: mindformers' ChatGLM2-6B runs on 8 x Ascend 910A (32 GB), from the
project's seed README: full fine-tune dp8, batch 8, seq 193, optimizer shard + recompute: 25.2 GB per
device; LoRA dp4, batch 8, seq 193: 22.38 GB. "GB" is read both ways (GiB as npu-smi reports, and 1e9);
the plan is within 20% of either. No constant of the plan was fitted to them (see the module docstring).
Against this machine: bench/bench_plan.py (measured peak memory of a training step), run by ``make bench``;
here only checked to run on a tiny model.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml

from glm_common.memory_plan import (DTYPE_BYTES, PlanError, fixes, layout_from_config, parse_size,
                                    plan_memory)
from glm_common.names import hf_param_shapes
from tests.conftest import ROOT

GLM2_FT = os.path.join(ROOT, "configs", "glm2", "run_glm2_6b_finetune.yaml")
GLM2_LORA = os.path.join(ROOT, "configs", "glm2", "run_glm2_6b_lora.yaml")
TINY_LORA = os.path.join(ROOT, "configs", "tiny", "run_tiny_lora.yaml")


def _raw(path, **edits):
    raw = yaml.safe_load(open(path))
    for dotted, value in edits.items():
        node = raw
        *head, last = dotted.split("__")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return raw


def _within(predicted, published_gb, tol=0.20):
    for unit in (2 ** 30, 1e9):
        measured = published_gb * unit
        assert abs(predicted - measured) / measured <= tol, (predicted / unit, published_gb)


def test_full_finetune_dp8_opt_shard_recompute_matches_910a():
    # mindformers' layout of the published row: semi-auto parallel, dp 8, optimizer shard, recompute
    # (the published row says seq 193; mindformers' YAML, shipped here, trains 192)
    raw = _raw(GLM2_FT, parallel__parallel_mode=1, recompute_config__recompute=True)
    L = layout_from_config(raw, GLM2_FT, device_memory="32GB")
    assert (L.dp, L.mp, L.pp, L.batch_size, L.seq_length, L.opt_shard, L.recompute) == (8, 1, 1, 8, 192, True, True)
    p = plan_memory(L)
    _within(p["total_bytes"], 25.2)
    assert p["fits"] is True


def test_lora_dp4_matches_910a():
    # the published LoRA row: dp 4, batch 8, no optimizer shard, no recompute (mindformers' YAML ships dp 8
    # with both on)
    raw = _raw(GLM2_LORA, parallel_config__data_parallel=4, parallel__enable_parallel_optimizer=False,
               recompute_config__recompute=False)
    L = layout_from_config(raw, GLM2_LORA, device_memory="32GB")
    assert (L.dp, L.batch_size, L.seq_length, L.opt_shard, L.recompute, L.method) == (4, 8, 192, False, False, "lora")
    p = plan_memory(L)
    _within(p["total_bytes"], 22.38)
    # only the LoRA matrices train: rank 8 on query_key_value of 28 layers
    c = L.config
    assert p["model"]["trained_parameters"] == 28 * 8 * (c.hidden_size + c.qkv_size)


def test_weights_are_the_real_parameter_bytes():
    L = layout_from_config(_raw(GLM2_LORA, parallel__enable_parallel_optimizer=False), GLM2_LORA)
    p = plan_memory(L)
    n = sum(int(__import__("math").prod(s)) for s in hf_param_shapes(L.config, include_prefix=False).values())
    lora = p["model"]["trained_parameters"]
    assert p["per_device_bytes"]["weights"] == (n + lora) * DTYPE_BYTES["float16"]
    assert 6.2e9 < n < 6.3e9


def test_6b_full_finetune_without_optimizer_shard_does_not_fit_and_names_the_fix(tmp_path):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(_raw(GLM2_FT, parallel__enable_parallel_optimizer=False)))
    r = subprocess.run([sys.executable, "-m", "mindspore_glm.plan", "--config", str(cfg), "--device-memory", "32GB"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    assert "does NOT fit" in r.stdout
    fix_lines = r.stdout.split("it would fit with:")[1]
    # the shipped YAML is semi-auto already: the fix is the one key
    assert "optimizer shard (parallel.enable_parallel_optimizer: True)" in fix_lines
    # a data-parallel copy of it is told the parallel mode the optimizer shard needs as well
    dp = tmp_path / "ft_dp.yaml"
    dp.write_text(yaml.safe_dump(_raw(GLM2_FT, parallel__enable_parallel_optimizer=False, parallel__parallel_mode=0)))
    r = subprocess.run([sys.executable, "-m", "mindspore_glm.plan", "--config", str(dp), "--device-memory", "32GB"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "does NOT fit" in r.stdout, r.stderr
    assert "optimizer shard (parallel.enable_parallel_optimizer: True with parallel.parallel_mode: 1)" in \
        r.stdout.split("it would fit with:")[1]
    # the JSON twin: the same plan, the per-device total in total_bytes
    r = subprocess.run([sys.executable, "-m", "mindspore_glm.plan", "--config", str(cfg), "--device-memory", "32GB",
                        "--json"], capture_output=True, text=True, cwd=ROOT)
    p = json.loads(r.stdout)
    assert p["fits"] is False and p["total_bytes"] > 32 * 2 ** 30 and p["budget_bytes"] == 32 * 2 ** 30
    assert p["total_bytes"] == sum(p["per_device_bytes"].values())
    assert any("optimizer shard" in f["change"] and f["total_bytes"] <= 32 * 2 ** 30 for f in p["fixes"])


def test_each_parallel_mode_shards_what_it_should():
    # the finetune YAML's model and batch in data-parallel mode, no optimizer shard, no recompute
    base = layout_from_config(_raw(GLM2_FT, parallel__enable_parallel_optimizer=False, parallel__parallel_mode=0,
                                   recompute_config__recompute=False), GLM2_FT)
    plain = plan_memory(base)["per_device_bytes"]
    import dataclasses
    # semi-auto optimizer shard: weights, gradients and states / dp (the gathered weights kept for backward)
    sh = plan_memory(dataclasses.replace(base, opt_shard=True, semi_auto=True))["per_device_bytes"]
    for k in ("weights", "gradients", "optimizer_states"):
        assert abs(sh[k] - plain[k] / 8) <= 8, k
    assert sh["gathered_weights"] == plain["weights"]
    # ... unless the AllGather is recomputed: two layers' worth
    shc = plan_memory(dataclasses.replace(base, opt_shard=True, semi_auto=True, comm_recompute=True))
    assert shc["per_device_bytes"]["gathered_weights"] < plain["weights"] / 10
    # data-parallel mode: MindSpore's optimizer shard keeps the whole moments (and masters) on every rank
    dp = plan_memory(dataclasses.replace(base, opt_shard=True))["per_device_bytes"]
    for k in ("weights", "gradients", "optimizer_states", "master_weights"):
        assert dp[k] == plain[k], k
    assert plain["optimizer_states"] == 2 * plain["master_weights"] == 4 * plain["weights"]   # float32, float16
    # model parallel 2: the linear weights halve, the norms and embedding (vocab_emb_dp) do not
    mp = plan_memory(dataclasses.replace(base, mp=2, dp=4))["per_device_bytes"]
    assert 0.5 * plain["weights"] < mp["weights"] < 0.6 * plain["weights"]
    # pipeline 2: each stage about half the layers
    pp = plan_memory(dataclasses.replace(base, pp=2, dp=4, micro_batch_num=2))
    assert pp["per_device_bytes"]["weights"] < 0.6 * plain["weights"] and len(pp["stage_totals_bytes"]) == 2
    # recompute: only layer inputs kept
    a = plan_memory(base)["activations_bytes"]
    assert a["with_recompute"] < a["without_recompute"] / 4


def test_torch_fsdp_layout():
    raw = _raw(GLM2_FT)
    ddp = plan_memory(layout_from_config(_raw(GLM2_FT, parallel__enable_parallel_optimizer=False), GLM2_FT,
                                         backend="torch"))
    fsdp = plan_memory(layout_from_config(raw, GLM2_FT, backend="torch"))
    for k in ("weights", "gradients", "optimizer_states"):
        assert fsdp["per_device_bytes"][k] * 7 < ddp["per_device_bytes"][k], k
    # FSDP gathers the root (embedding, output layer) and two blocks, not the whole model
    assert 0 < fsdp["per_device_bytes"]["gathered_weights"] < ddp["per_device_bytes"]["weights"] / 4
    # DDP keeps its gradient buckets: the workspace holds one more copy of the gradients
    assert ddp["per_device_bytes"]["workspace"] > ddp["per_device_bytes"]["gradients"]
    r = subprocess.run([sys.executable, "-m", "torch_glm.plan", "--config", GLM2_FT, "--json", "--devices", "8"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode in (0, 1), r.stderr
    assert json.loads(r.stdout)["backend"] == "torch"


def test_ptuning_trains_only_the_prefix():
    raw = _raw(GLM2_LORA)
    raw["model"]["model_config"]["pet_config"] = {"pet_type": "ptuning2", "pre_seq_len": 128}
    L = layout_from_config(raw, "p.yaml")
    p = plan_memory(L)
    assert p["method"] == "ptuning2"
    assert p["model"]["trained_parameters"] == 128 * L.config.prefix_kv_size


def test_fixes_lists_only_changes_that_fit():
    # the published LoRA layout (dp 4, no optimizer shard, no recompute) against a 16 GB device
    raw = _raw(GLM2_LORA, parallel_config__data_parallel=4, parallel__enable_parallel_optimizer=False,
               recompute_config__recompute=False)
    L = layout_from_config(raw, GLM2_LORA, device_memory="16GB")
    assert plan_memory(L)["fits"] is False
    fs = fixes(L)
    assert fs and all(f["total_bytes"] <= 16 * 2 ** 30 for f in fs)
    assert any(f["change"].startswith("recompute") for f in fs)
    assert any(f["change"].startswith("batch size") for f in fs)


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    for args, expected in (([str(bad)], f"{bad}:2: not valid YAML"), ([TINY_LORA, "--devices", "0"], "--devices: 0"),
                           ([TINY_LORA, "--device-memory", "lots"], "--device-memory: expected a size")):
        r = subprocess.run([sys.executable, "-m", "mindspore_glm.plan", "--config", *args], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert parse_size("30GB") == 30 * 2 ** 30 and parse_size("512MiB") == 2 ** 29
    with pytest.raises(PlanError):
        parse_size("-3GB")


@pytest.mark.slow
def test_the_plan_benchmark_runs_on_a_tiny_model():
    """bench/bench_plan.py as a user runs it (``make bench`` runs it at its real size and reports the
    ratios), here on a tiny model: one row per setup with a prediction and a measurement, none failed.
    Its ratios are a benchmark's figures, not asserted here."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_plan.py"), "--layers", "1", "--hidden",
                        "128", "--vocab", "1024", "--batch", "1", "--seq", "32", "--only", "ms-lora,torch-full"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.split()[:1] in
            (["ms-lora"], ["torch-full"])}
    assert sorted(rows) == ["ms-lora", "torch-full"] and not any("failed" in x for x in rows.values()), r.stdout
    for row in rows.values():
        assert float(row[1]) > 0 and float(row[2]) > 0, r.stdout     # predicted and measured MiB
    assert "largest deviation:" in r.stdout


@pytest.mark.parametrize("name", ["lora", "finetune"])
def test_optimizer_state_and_master_bytes_are_what_the_runners_hold(name, tmp_path):
    """The shipped YAML (float16 weights), shrunk: the plan's optimizer states (two float32 moments) and
    float32 master weights are the bytes MindSpore's and torch_glm's optimizers hold for it; in float32
    there are no masters."""
    import warnings
    import numpy as np
    import torch
    from glm_common.run_config import settings_from_config
    out = tmp_path / f"{name}.yaml"
    subprocess.run([sys.executable, "scripts/shrink_config.py", f"configs/glm2/run_glm2_6b_{name}.yaml", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    for dtype in ("float16", "float32"):
        raw = yaml.safe_load(open(out))
        raw["model"]["model_config"]["param_init_type"] = dtype
        raw["use_parallel"] = False          # one device, as the runners below
        raw["parallel_config"]["data_parallel"] = 1
        raw["parallel"]["enable_parallel_optimizer"] = False
        raw["load_checkpoint"] = ""
        b = plan_memory(layout_from_config(raw, str(out)))["per_device_bytes"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = settings_from_config(raw, str(out), warn=False)
        lrs = np.full(4, 1e-4)
        from mindspore_glm.train import build_model as ms_build
        from mindspore_glm.train_step import make_optimizer as ms_optimizer
        _, params = ms_build(s)
        opt = ms_optimizer(params, s, lrs)
        held = sum(m.asnumpy().nbytes for m in list(opt.moments1) + list(opt.moments2))
        masters = sum(m.asnumpy().nbytes for m in opt.masters)
        assert (b["optimizer_states"], b["master_weights"]) == (held, masters)
        assert held > 0 and (masters == 0) == (dtype == "float32")
        from torch_glm.train import build_model as pt_build
        from torch_glm.train_step import make_optimizer as pt_optimizer
        model, _ = pt_build(s, "cpu")
        opt = pt_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], s, lrs)
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        held = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)
        masters = sum(m.numel() * m.element_size() for _, m in opt.master_pairs)
        assert (b["optimizer_states"], b["master_weights"]) == (held, masters)


def test_pipeline_stages_hold_the_layers_the_runner_gives_them():
    """mindformers' rule, as the runner places the layers: (layers + 1) // pp a stage, the rest on the
    last (28 layers, pp 8: 3 on each of the first seven, 7 on the last)."""
    import dataclasses
    from glm_common.memory_plan import _stage_layers
    from mindspore_glm.parallel import layer_stages
    base = layout_from_config(_raw(GLM2_FT, parallel__enable_parallel_optimizer=False, parallel__parallel_mode=1,
                                   recompute_config__recompute=False), GLM2_FT)
    L = dataclasses.replace(base, pp=8, dp=1, micro_batch_num=8)
    assert [len(x) for x in _stage_layers(L)] == [3] * 7 + [7]
    stages = layer_stages(28, 8)
    assert [[i for i in range(28) if stages[i] == k] for k in range(8)] == _stage_layers(L)
    p = plan_memory(L)
    assert p["stage"] == 7 and p["stage_totals_bytes"][7] == max(p["stage_totals_bytes"])
