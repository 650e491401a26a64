"""The semi-auto-parallel layouts compiled by MindSpore itself (DryRun, ``MS_SIMULATION_LEVEL=1``) on CPU.

``mindspore_glm.dryrun`` compiles the real training step (``train.build_model`` + ``train.build_step``) of a
YAML for one simulated rank per process; the stand-in CANN libraries are built once with gcc
(``mindspore_glm.fakecann``). What is asserted comes from MindSpore: that it compiles each rank that
differs, the peak it counts, and the strategy file it writes (``strategy_ckpt_save_file``), read back with
MindSpore's own reader and merged with ``mindspore.transform_checkpoints``.

Each tiny layout is compiled once per session, when a test first needs it (``compiled``).
"""
import copy
import os
import shutil

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.dryrun

TINY_YAML = ROOT / "configs" / "tiny" / "run_tiny_finetune.yaml"
GLM2_FINETUNE = ROOT / "configs" / "glm2" / "run_glm2_6b_finetune.yaml"


def _tiny(dp=1, mp=1, pp=1, micro=1, opt_shard=False, recompute=False, select=None, **extra):
    raw = yaml.safe_load(open(TINY_YAML))
    raw["use_parallel"] = True
    raw["load_checkpoint"] = ""
    raw["parallel"].update(parallel_mode=1, full_batch=True, enable_parallel_optimizer=opt_shard)
    raw["parallel_config"].update(data_parallel=dp, model_parallel=mp, pipeline_stage=pp, micro_batch_num=micro)
    rc = {"recompute": recompute}
    if select is not None:
        rc["select_recompute"] = select
    raw["recompute_config"] = rc
    for key, value in extra.items():           # "a.b.c": value
        node = raw
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return raw


_FLASH = {"model.model_config.use_flash_attention": True, "model.model_config.seq_length": 128,
          "train_dataset.max_target_length": 63}
# ChatGLM2-6B's attention shape (32 heads, 2 key/value groups, fused query_key_value) at 1/16 of its width
_NARROW_6B = {"model.model_config.num_attention_heads": 32, "model.model_config.kv_channels": 8,
              "model.model_config.hidden_size": 256, "model.model_config.ffn_hidden_size": 320}

#: name -> (YAML mapping, ranks to compile (None: the ranks that differ), Ascend chip)
LAYOUTS = {
    "dp2_mp2": (_tiny(dp=2, mp=2), None, ""),
    "dp2_mp2_recompute": (_tiny(dp=2, mp=2, recompute=True), [0], ""),
    "dp4_opt_shard": (_tiny(dp=4, opt_shard=True), None, ""),
    "dp4_opt_shard_select_recompute": (_tiny(dp=4, opt_shard=True, select=True), [0], ""),
    "pp2_micro4": (_tiny(pp=2, micro=4), None, ""),
    # FlashAttentionScore on Atlas A2: key/value groups split (mp 2 divides the 2 groups) or repeated (mp 4)
    "dp2_mp2_flash": (_tiny(dp=2, mp=2, **_FLASH), [0], "ascend910b"),
    "mp4_flash": (_tiny(mp=4, **_FLASH), [0], "ascend910b"),
    # the same YAML on a 910A, which has no FlashAttentionScore
    "dp2_mp2_flash_910a": (_tiny(dp=2, mp=2, **_FLASH), [0], "ascend910"),
    # 2 key/value groups under model_parallel 8 and 4, with and without FlashAttentionScore
    "narrow6b_mp8": (_tiny(mp=8, **_NARROW_6B), [0], ""),
    "narrow6b_mp4_flash": (_tiny(dp=2, mp=4, **_NARROW_6B, **_FLASH), [0], "ascend910b"),
    # gradient accumulation under semi-auto parallel
    "dp2_mp2_grad_accum": (_tiny(dp=2, mp=2, **{"runner_config.gradient_accumulation_steps": 2}), [0], ""),
}


@pytest.fixture(scope="session")
def fakecann():
    """The stand-in CANN libraries, built once (into the user's cache folder)."""
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("gcc is not installed: the DryRun stand-in libraries cannot be built")
    from mindspore_glm.fakecann import build
    return build()


class _Compiled(dict):
    """``{name: (report, strategy folder)}`` of the LAYOUTS, each compiled when first asked for (its ranks two
    processes at a time)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        from mindspore_glm.dryrun import dryrun
        raw, ranks, soc = LAYOUTS[name]
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        rep = dryrun(str(path), ranks=ranks, strategy_dir=str(self.root / name), timeout=900, jobs=2, soc=soc)
        self[name] = (rep, str(self.root / name / "strategy"))
        return self[name]


@pytest.fixture(scope="session")
def compiled(fakecann, tmp_path_factory):
    return _Compiled(tmp_path_factory.mktemp("dryrun"))


def _ok(rep):
    for r in rep["ranks"]:
        assert r["ok"], f"rank {r['rank']}: {r['error']} ({r['key']})"
        assert r["peak_bytes"] and r["peak_bytes"] > 0
    return {r["rank"]: r for r in rep["ranks"]}


def _layouts(strategy_dir, rank):
    """MindSpore's own reading of the strategy file it wrote: ``{param: (dev_matrix, tensor_map, opt_size)}``."""
    from mindspore.parallel._parallel_serialization import _build_searched_strategy, _convert_to_list
    path = os.path.join(strategy_dir, f"ckpt_strategy_rank_{rank}.ckpt")
    out = {}
    for name, v in _convert_to_list(_build_searched_strategy(path)).items():
        out[name] = (list(v[0]), [int(t) if not isinstance(t, (list, tuple)) else list(t) for t in v[1]], v[5])
    return out


QKV = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
DENSE = "transformer.encoder.layers.0.self_attention.dense.weight"
EMB = "transformer.embedding.embedding_weight"
H4H = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
OUT = "transformer.output_layer.weight"


def test_dp2_mp2_compiles_with_the_glm2_split(compiled):
    rep, sdir = compiled["dp2_mp2"]
    ranks = _ok(rep)
    assert sorted(ranks) == [0, 3]
    lay = _layouts(sdir, 0)
    # MindSpore's layout of the sharded linears: column parallel on the output axis, row parallel on the input
    assert lay[QKV][0] == [2, 2] and lay[QKV][1] == [0, -1]
    assert lay[DENSE][0] == [2, 2] and lay[DENSE][1] == [-1, 0]
    assert lay[OUT][1] == [0, -1]                     # vocab axis over model_parallel


def test_recompute_lowers_mindsporess_peak(compiled):
    plain = _ok(compiled["dp2_mp2"][0])[0]["peak_bytes"]
    recomputed = _ok(compiled["dp2_mp2_recompute"][0])[0]["peak_bytes"]
    assert recomputed < plain


def test_dp4_optimizer_shard_splits_weights_over_the_replicas(compiled):
    rep, sdir = compiled["dp4_opt_shard"]
    assert sorted(_ok(rep)) == [0, 3]
    lay = _layouts(sdir, 3)
    # opt_weight_shard_size -1: over every data-parallel replica; 0 (no shard) without the optimizer shard
    assert lay[EMB][2] == -1 and lay[H4H][2] == -1
    plain = _layouts(compiled["dp2_mp2"][1], 0)
    assert plain[EMB][2] == 0 and plain[H4H][2] == 0


def test_select_recompute_compiles_and_lowers_the_peak(compiled):
    full = _ok(compiled["dp4_opt_shard"][0])[0]["peak_bytes"]
    selected = _ok(compiled["dp4_opt_shard_select_recompute"][0])[0]["peak_bytes"]
    assert selected < full


def test_pipeline_stages_hold_their_own_layers(compiled):
    rep, sdir = compiled["pp2_micro4"]
    ranks = _ok(rep)
    assert sorted(ranks) == [0, 1] and ranks[1]["stage"] == 1
    first, last = _layouts(sdir, 0), _layouts(sdir, 1)
    assert EMB in first and OUT not in first
    assert OUT in last and EMB not in last
    assert QKV in first and QKV not in last


def test_merge_shards_reads_the_strategy_file_mindspore_wrote(compiled, tmp_path):
    """convert/merge_shards.py split + merge with the real strategy file, against transform_checkpoints."""
    import mindspore as ms
    from convert.merge_shards import merge_shards, split_checkpoint
    from convert.ms_ckpt import MSCheckpoint, save_ms_checkpoint
    from convert.strategy import load_strategy
    _, sdir = compiled["dp2_mp2"]
    strat = os.path.join(sdir, "ckpt_strategy_rank_0.ckpt")
    st = load_strategy(strat)
    assert st.device_num == 4
    rng = np.random.default_rng(0)
    shapes = {}
    for name in st.names():
        lay = st.layout(name)
        shapes[name] = lay
    # the full weights: every parameter the strategy lists, at its full shape (MindSpore's checkpoint of it)
    from glm_common.config import preset
    from glm_common.names import hf_param_shapes, hf_to_ms
    cfg = preset("tiny")
    full = {hf_to_ms(k): rng.standard_normal(v).astype(np.float32) for k, v in hf_param_shapes(cfg).items()}
    full = {k: v for k, v in full.items() if k in shapes}
    assert QKV in full and DENSE in full and OUT in full
    one = tmp_path / "one" / "rank_0"
    one.mkdir(parents=True)
    save_ms_checkpoint(full.items(), one / "full.ckpt")
    split_checkpoint(str(one / "full.ckpt"), strat, str(tmp_path / "split"), progress=False)
    ms.transform_checkpoints(str(tmp_path / "one"), str(tmp_path / "ms_split"), "part_", None, strat)
    for r in range(4):
        ours = MSCheckpoint(tmp_path / "split" / f"rank_{r}" / f"checkpoint_{r}.ckpt")
        theirs = {k: v.asnumpy() for k, v in
                  ms.load_checkpoint(str(tmp_path / "ms_split" / f"rank_{r}" / f"part_{r}.ckpt")).items()}
        for n in full:
            assert ours.read(n).tobytes() == theirs[n].tobytes(), (r, n)
    merge_shards(str(tmp_path / "split"), strat, str(tmp_path / "back.ckpt"), progress=False)
    back = MSCheckpoint(tmp_path / "back.ckpt")
    for n, w in full.items():
        assert back.read(n).tobytes() == w.tobytes(), n


# ------------------------------------------------------------------------------- FlashAttention, KV groups
@pytest.mark.parametrize("name", ["dp2_mp2_flash", "mp4_flash", "narrow6b_mp4_flash"])
def test_flash_attention_compiles_under_semi_auto(compiled, name):
    """The mask's strategy (one [S, K] mask, not split) and the key/value groups under model_parallel 2 (split)
    and 4 (more than the 2 groups: repeated per head) are ones MindSpore's FlashAttentionScore accepts."""
    row = _ok(compiled[name][0])[0]
    assert row["flash_attention"] is True and not row["warnings"]


def test_flash_attention_on_910a_falls_back_in_one_line(compiled):
    row = _ok(compiled["dp2_mp2_flash_910a"][0])[0]
    assert row["flash_attention"] is False
    assert len(row["warnings"]) == 1 and "\n" not in row["warnings"][0]
    assert "use_flash_attention: True" in row["warnings"][0] and "ascend910" in row["warnings"][0]
    # without the fused kernel the step keeps the [B, np, S, S] probabilities: MindSpore's peak is higher
    assert row["peak_bytes"] > _ok(compiled["dp2_mp2_flash"][0])[0]["peak_bytes"]


def test_two_kv_groups_under_model_parallel_8(compiled):
    """2 key/value groups, model_parallel 8: each head reads its own copy of its group (kv_repeat), and
    MindSpore splits the fused query_key_value weight on its output axis 8 ways."""
    rep, sdir = compiled["narrow6b_mp8"]
    _ok(rep)
    lay = _layouts(sdir, 0)
    assert lay[QKV][0] == [8] or lay[QKV][0][-1] == 8
    assert lay[QKV][1][0] == 0


def test_gradient_accumulation_under_semi_auto_is_refused_in_one_line(compiled):
    row = compiled["dp2_mp2_grad_accum"][0]["ranks"][0]
    assert not row["ok"] and row["key"] == "runner_config.gradient_accumulation_steps"
    assert "\n" not in row["error"] and "semi-auto" in row["error"]


# ------------------------------------------------------------------------------- full-width ChatGLM2-6B
@pytest.mark.slow
def test_glm2_6b_layers_under_the_seed_full_finetune_layout(fakecann):
    """Full-width ChatGLM2-6B layers (4096 / 13696 / 32 heads / 2 groups, vocab 65024) under the shipped full
    fine-tune layout (dp 8 + optimizer shard + recompute, batch 8 x 192), rank 0, compiled with 1, 2 and 3
    layers: MindSpore's per-layer peak is the same from layer to layer (linear), so the 28-layer peak is
    the 1-layer peak plus 27 of them; it fits the YAML's max_device_memory (30GB). Level 1 allocates no
    tensors: the compile's host memory stays far below the device memory it counts."""
    from mindspore_glm.dryrun import dryrun
    peaks, plans = {}, {}
    for n in (1, 2, 3):
        rep = dryrun(str(GLM2_FINETUNE), ranks=[0], num_layers=n, timeout=1200)
        lay = rep["layout"]
        assert (lay["data_parallel"], lay["model_parallel"], lay["optimizer_shard"], lay["recompute"]) == \
            (8, 1, True, True)
        row = _ok(rep)[0]
        assert (row["batch"], row["seq"]) == (64, 192)          # the global batch 8 x dp 8 (full_batch)
        assert row["host_rss_bytes"] < 2 * 2 ** 30 < row["peak_bytes"]
        peaks[n], plans[n] = row["peak_bytes"], row["plan_bytes"]
    step1, step2 = peaks[2] - peaks[1], peaks[3] - peaks[2]
    assert step1 > 0 and abs(step2 - step1) / step1 < 0.01
    at_28 = peaks[1] + 27 * step1
    assert at_28 < 30 * 2 ** 30
    # the memory plan's 28 layers (glm_common.memory_plan) within 15% of MindSpore's count: float32 masters and
    # moments split by the optimizer shard as the plan assumes (whole on every rank, one layer alone was 21.8 GiB)
    plan_28 = plans[1] + 27 * (plans[2] - plans[1])
    assert 0.85 < at_28 / plan_28 < 1.15, (at_28 / 2 ** 30, plan_28 / 2 ** 30)


def test_without_gcc_the_command_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLM2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.delenv("ASCEND_HOME_PATH", raising=False)
    from mindspore_glm.dryrun import main
    if __import__("mindspore_glm.fakecann", fromlist=["installed_cann"]).installed_cann():
        pytest.skip("CANN is installed here: the stand-ins are not built")
    assert main(["--config", str(TINY_YAML), "--devices", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs gcc" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))
