"""convert/merge_shards.py against the original full weights and against mindspore.transform_checkpoints.

Sharded runs are built here the way a semi-auto-parallel mindformers glm2 run saves them: the full
weights of a glm2-shaped model are cut per rank with plain ``np.split`` (query_key_value and
dense_h_to_4h on the output axis, dense and dense_4h_to_h on the input axis, embedding and output layer
on the vocab axis, norms replicated; optimizer parallel cuts dim 0 of each slice again across the
data-parallel group), each rank's slice written to ``rank_N/glm2_rank_N-1_10.ckpt``, and the layouts to
strategy files (one per pipeline stage).
"""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from convert.merge_shards import main as merge_main, merge_shards, split_checkpoint
from convert.ms_ckpt import MSCheckpoint, save_ms_checkpoint
from convert.strategy import Layout, load_strategy, write_strategy_file
from glm_common.config import preset
from glm_common.names import hf_param_shapes, hf_to_ms
from tests.conftest import ROOT, TINY_MODEL

SCRIPT = str(ROOT / "convert" / "merge_shards.py")
TINY = preset("tiny")
# wider and deeper than tiny, with biases everywhere and plain multi-head attention
WIDE = dataclasses.replace(TINY, num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8,
                           multi_query_attention=False, add_bias_linear=True, padded_vocab_size=1024)

OUT_AXIS = ("query_key_value.", "dense_h_to_4h.")
IN_AXIS = ("self_attention.dense.weight", "dense_4h_to_h.weight")


def split_axis(name):
    """The glm2 model-parallel split: output axis 0, input axis 1, vocab axis 0, else replicated."""
    if any(k in name for k in OUT_AXIS) or name.endswith(("embedding_weight", "output_layer.weight")):
        return 0
    if any(name.endswith(k) for k in IN_AXIS):
        return 1
    return None


def full_weights(cfg, dtype=np.float32, seed=0, lora=False):
    rng = np.random.default_rng(seed)
    out = {}
    for hf, shape in hf_param_shapes(cfg).items():
        out[hf_to_ms(hf)] = rng.standard_normal(shape).astype(dtype)
        if lora and hf.endswith("query_key_value.weight"):
            base = hf_to_ms(hf)[:-len(".weight")]
            out[base + ".mindpet_delta_lora_a"] = rng.standard_normal((4, shape[1])).astype(dtype)
            out[base + ".mindpet_delta_lora_b"] = rng.standard_normal((shape[0], 4)).astype(dtype)
    return out


def stage_of(name, cfg, pp):
    if pp == 1:
        return 0
    if "layers." in name:
        return min(int(name.split("layers.")[1].split(".")[0]) * pp // cfg.num_layers, pp - 1)
    return 0 if "embedding" in name else pp - 1


def build_run(root, cfg=TINY, dp=1, mp=2, pp=1, opt=False, optimizer=False, dtype=np.float32, lora=False,
              weights=None):
    """Write ``root/ckpt/rank_N/*.ckpt`` and ``root/strategy/`` of a dp x mp x pp run; return the full weights
    (with optimizer state when ``optimizer``)."""
    W = weights if weights is not None else full_weights(cfg, dtype, lora=lora)
    full = dict(W)
    if optimizer:
        rng = np.random.default_rng(1)
        for n, w in W.items():
            full["adam_m." + n] = rng.standard_normal(w.shape).astype(np.float32)
            full["adam_v." + n] = rng.random(w.shape).astype(np.float32)
    scalars = {"global_step": np.array([10], np.int32), "learning_rate": np.array(1e-4, np.float32)} \
        if optimizer else {}
    n_local = dp * mp
    layouts = [dict() for _ in range(pp)]
    for n, w in full.items():
        base = n.split(".", 1)[1] if n.startswith(("adam_m.", "adam_v.")) else n
        ax = None if "mindpet_delta_lora_a" in n else split_axis(base)
        if "mindpet_delta_lora_b" in n:
            ax = 0
        tm = tuple(0 if i == ax else -1 for i in range(w.ndim))
        lay = Layout((dp, mp), tm) if ax is not None else Layout((dp, 1, mp), tm)
        if opt and dp > 1:
            size = dp if ax is not None else n_local
            lay = lay.with_opt_shard(size) if w.shape[0] % (size * (mp if ax == 0 else 1)) == 0 else lay
        layouts[stage_of(base, cfg, pp)][n] = lay
    for r in range(pp * n_local):
        st, local = divmod(r, n_local)
        d, m = divmod(local, mp)
        tensors = []
        for n, w in full.items():
            if n not in layouts[st]:
                continue
            lay = layouts[st][n]
            ax = next((i for i, k in enumerate(lay.tensor_map) if k != -1), None)
            piece = np.split(w, mp, axis=ax)[m] if ax is not None else w
            if lay.opt_shard_size > 1:  # optimizer parallel: dim 0 of the slice over the replicas
                piece = np.split(piece, lay.opt_shard_size, axis=0)[d if ax is not None else local]
            tensors.append((n, np.ascontiguousarray(piece)))
        tensors += list(scalars.items())
        save_ms_checkpoint(tensors, root / "ckpt" / f"rank_{r}" / f"glm2_rank_{r}-1_10.ckpt")
    for st in range(pp):
        write_strategy_file(str(root / "strategy" / f"ckpt_strategy_rank_{st * n_local}.ckpt"), layouts[st], st)
    full.update(scalars)
    return full


def strategy_arg(root, pp):
    return str(root / "strategy") if pp > 1 else str(root / "strategy" / "ckpt_strategy_rank_0.ckpt")


def load_ms(path):
    import mindspore as ms
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def ours(path):
    c = MSCheckpoint(path)
    return {n: c.read(n) for n in c.names}


def assert_bits_equal(got, want):
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].shape == want[n].shape and got[n].dtype == want[n].dtype, n
        assert got[n].tobytes() == want[n].tobytes(), n


def transform(root, pp):
    """mindspore.transform_checkpoints' merge of the same shards (the independent implementation)."""
    import mindspore as ms
    strat = str(root / "strategy" / "ckpt_strategy_rank_0.ckpt")
    if pp > 1:
        strat = str(root / "merged_strategy.ckpt")
        ms.merge_pipeline_strategys(str(root / "strategy"), strat)
    ms.transform_checkpoints(str(root / "ckpt"), str(root / "ms_out"), "merged_", strat, None)
    return load_ms(root / "ms_out" / "rank_0" / "merged_0.ckpt")


RUNS = {
    "mp2": dict(mp=2),
    "mp4": dict(cfg=WIDE, mp=4),
    "dp2xmp2": dict(dp=2, mp=2, cfg=WIDE),
    "pp2xmp2": dict(mp=2, pp=2, cfg=WIDE),
    "opt_dp2xmp2": dict(dp=2, mp=2, opt=True, optimizer=True),
    "opt_dp4_pp2_bf16": dict(dp=4, mp=1, pp=2, opt=True, optimizer=True, cfg=WIDE, dtype="bfloat16"),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_merge_equals_full_weights_and_transform_checkpoints(tmp_path, run):
    kw = dict(RUNS[run])
    if kw.get("dtype") == "bfloat16":
        import ml_dtypes
        kw["dtype"] = ml_dtypes.bfloat16
    full = build_run(tmp_path, **kw)
    pp = kw.get("pp", 1)
    out = tmp_path / "merged.ckpt"
    s = merge_shards(str(tmp_path / "ckpt"), strategy_arg(tmp_path, pp), str(out), keep_optimizer=True,
                     progress=False)
    assert s["ranks"] == pp * kw.get("dp", 1) * kw["mp"] and s["stages"] == pp
    got = ours(out)
    assert_bits_equal(got, full)
    assert_bits_equal(load_ms(out), transform(tmp_path, pp))


def test_default_drops_optimizer_state_and_params_filters(tmp_path):
    full = build_run(tmp_path, dp=2, mp=2, opt=True, optimizer=True, lora=True)
    weights = {n: w for n, w in full.items()
               if not n.startswith(("adam_", "global_step", "learning_rate"))}
    src, strat = str(tmp_path / "ckpt"), strategy_arg(tmp_path, 1)
    merge_shards(src, strat, str(tmp_path / "w.ckpt"), progress=False)
    assert_bits_equal(ours(tmp_path / "w.ckpt"), weights)
    merge_shards(src, strat, str(tmp_path / "l.ckpt"), params="lora", progress=False)
    lora = {n: w for n, w in weights.items() if "mindpet_delta_lora_" in n}
    assert len(lora) == 2 * TINY.num_layers
    assert_bits_equal(ours(tmp_path / "l.ckpt"), lora)
    merge_shards(src, strat, str(tmp_path / "t.ckpt"), params="trainable", keep_optimizer=True, progress=False)
    want = {n: w for n, w in full.items() if "mindpet_delta_lora_" in n or n in ("global_step", "learning_rate")}
    assert_bits_equal(ours(tmp_path / "t.ckpt"), want)


def test_cli_step_selection_and_summary(tmp_path):
    full = build_run(tmp_path, mp=2)
    # an older step beside the newest: the default takes step 10, --step 5 the older files
    for r in range(2):
        d = tmp_path / "ckpt" / f"rank_{r}"
        c = MSCheckpoint(d / f"glm2_rank_{r}-1_10.ckpt")
        save_ms_checkpoint(((n, c.read(n) * 0) for n in c.names), d / f"glm2_rank_{r}-1_5.ckpt")
    out = tmp_path / "m.ckpt"
    cmd = [sys.executable, SCRIPT, "--src", str(tmp_path / "ckpt"), "--strategy", strategy_arg(tmp_path, 1),
           "--output", str(out), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "merged 2 ranks" in res.stdout
    assert_bits_equal(ours(out), full)
    assert merge_main(cmd[2:-1] + ["--step", "5", "--quiet"]) == 1     # the merged file exists
    assert merge_main(cmd[2:-1] + ["--step", "5", "--quiet", "--overwrite"]) == 0
    assert all(not v.any() for v in ours(out).values())
    res = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--keep-optimizer" in res.stdout and "split" in res.stdout


@pytest.mark.parametrize("run", ["dp2xmp2", "pp2xmp2", "opt_dp2xmp2"])
def test_split_then_merge_roundtrip_and_matches_transform_checkpoints(tmp_path, run):
    kw = dict(RUNS[run])
    pp = kw.get("pp", 1)
    full = build_run(tmp_path, **kw)
    full_path = tmp_path / "full.ckpt"
    save_ms_checkpoint(full.items(), full_path)
    split_checkpoint(str(full_path), strategy_arg(tmp_path, pp), str(tmp_path / "split"), progress=False)
    # every rank file equals the one the run saved
    for r in range(pp * kw.get("dp", 1) * kw["mp"]):
        want = ours(tmp_path / "ckpt" / f"rank_{r}" / f"glm2_rank_{r}-1_10.ckpt")
        assert_bits_equal(ours(tmp_path / "split" / f"rank_{r}" / f"checkpoint_{r}.ckpt"), want)
    merge_shards(str(tmp_path / "split"), strategy_arg(tmp_path, pp), str(tmp_path / "back.ckpt"),
                 keep_optimizer=True, progress=False)
    assert_bits_equal(ours(tmp_path / "back.ckpt"), full)
    if pp == 1:  # transform_checkpoints' dst-strategy output of the full checkpoint
        import mindspore as ms
        os.makedirs(tmp_path / "one" / "rank_0")
        os.replace(full_path, tmp_path / "one" / "rank_0" / "full.ckpt")
        ms.transform_checkpoints(str(tmp_path / "one"), str(tmp_path / "ms_split"), "part_", None,
                                 strategy_arg(tmp_path, pp))
        for r in range(kw.get("dp", 1) * kw["mp"]):
            assert_bits_equal(ours(tmp_path / "split" / f"rank_{r}" / f"checkpoint_{r}.ckpt"),
                              load_ms(tmp_path / "ms_split" / f"rank_{r}" / f"part_{r}.ckpt"))


def test_strategy_file_roundtrip_and_mindspore_reads_it(tmp_path):
    build_run(tmp_path, dp=2, mp=2, opt=True, optimizer=True)
    path = str(tmp_path / "strategy" / "ckpt_strategy_rank_0.ckpt")
    st = load_strategy(path)
    lay = st.layout("transformer.encoder.layers.0.self_attention.query_key_value.weight")
    assert lay.dev_matrix == (2, 2) and lay.tensor_map == (0, -1) and lay.opt_shard_size == 2
    assert lay.opt_shard_step == 2
    from mindspore.parallel._parallel_serialization import _convert_to_list, _build_searched_strategy
    ms_view = _convert_to_list(_build_searched_strategy(path))
    for name, layouts in st.stages[0].items():
        dev, tm, _, field, step, size, stages = ms_view[name]
        assert (tuple(dev), tuple(tm), step, size, field) == (layouts.dev_matrix, layouts.tensor_map,
                                                              layouts.opt_shard_step, layouts.opt_shard_size, 0)


def test_merge_to_hf_gives_back_the_hf_checkpoint(tmp_path):
    """The tiny HF model sharded dp2 x mp2 with optimizer parallel, merged with --to-hf: same tensors."""
    from safetensors.numpy import load_file
    from glm_common.names import is_derived_buffer
    hf = {n: w for n, w in load_file(str(TINY_MODEL / "model.safetensors")).items() if not is_derived_buffer(n)}
    build_run(tmp_path, dp=2, mp=2, opt=True, optimizer=True, weights={hf_to_ms(n): w for n, w in hf.items()})
    res, out = run_cli(tmp_path, "--to-hf", str(tmp_path / "hf"), "--config", str(TINY_MODEL / "config.json"))
    assert res.returncode == 0, res.stderr
    got = {}
    for f in os.listdir(tmp_path / "hf"):
        if f.endswith(".safetensors"):
            got.update(load_file(str(tmp_path / "hf" / f)))
    assert_bits_equal(got, hf)


# ---------------------------------------------------------------------- bad input
def run_cli(tmp_path, *extra, strategy=None):
    out = tmp_path / "out" / "merged.ckpt"
    cmd = [sys.executable, SCRIPT, "--src", str(tmp_path / "ckpt"),
           "--strategy", strategy or strategy_arg(tmp_path, 1), "--output", str(out), "--quiet", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    return res, out


def assert_clean_failure(res, out, *words):
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.parent.exists() or not os.listdir(out.parent)


def test_missing_rank_file(tmp_path):
    build_run(tmp_path, dp=2, mp=2)
    os.remove(tmp_path / "ckpt" / "rank_3" / "glm2_rank_3-1_10.ckpt")
    res, out = run_cli(tmp_path)
    assert_clean_failure(res, out, "rank_3", "missing")


def test_strategy_not_matching_shards(tmp_path):
    build_run(tmp_path / "a", mp=2)
    build_run(tmp_path / "b", mp=4, cfg=TINY)
    os.makedirs(tmp_path / "ckpt")
    for r in range(2):
        os.replace(tmp_path / "a" / "ckpt" / f"rank_{r}", tmp_path / "ckpt" / f"rank_{r}")
    # a 4-rank strategy for 2-rank shards
    res, out = run_cli(tmp_path, strategy=str(tmp_path / "b" / "strategy" / "ckpt_strategy_rank_0.ckpt"))
    assert_clean_failure(res, out, "rank_2", "missing")
    # same number of ranks, the strategy of another model (more layers)
    build_run(tmp_path / "c", mp=2, cfg=WIDE)
    res, out = run_cli(tmp_path, strategy=str(tmp_path / "c" / "strategy" / "ckpt_strategy_rank_0.ckpt"))
    assert_clean_failure(res, out, "in no shard", "do not match")


def test_incomplete_coverage(tmp_path):
    build_run(tmp_path, dp=1, mp=4, cfg=WIDE)
    victim = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    path = tmp_path / "ckpt" / "rank_2" / "glm2_rank_2-1_10.ckpt"
    c = MSCheckpoint(path)
    save_ms_checkpoint([(n, c.read(n)) for n in c.names if n != victim], path)
    res, out = run_cli(tmp_path)
    assert_clean_failure(res, out, victim, "incomplete coverage", "rank_2")


def test_replicas_that_differ(tmp_path):
    build_run(tmp_path, dp=2, mp=2)
    victim = "transformer.encoder.layers.0.input_layernorm.weight"
    path = tmp_path / "ckpt" / "rank_3" / "glm2_rank_3-1_10.ckpt"
    c = MSCheckpoint(path)
    save_ms_checkpoint([(n, c.read(n) + (1e-3 if n == victim else 0)) for n in c.names], path)
    res, out = run_cli(tmp_path)
    assert_clean_failure(res, out, victim, "rank_3", "differs")


def test_split_refuses_non_empty_output_and_leaves_nothing(tmp_path):
    full = build_run(tmp_path, mp=2)
    bad = dict(full)
    bad["transformer.output_layer.weight"] = bad["transformer.output_layer.weight"][:-1]  # odd vocab: no split
    save_ms_checkpoint(bad.items(), tmp_path / "bad.ckpt")
    res = subprocess.run([sys.executable, SCRIPT, "split", "--src", str(tmp_path / "bad.ckpt"), "--strategy",
                          strategy_arg(tmp_path, 1), "--output", str(tmp_path / "s"), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "transformer.output_layer.weight" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".split-")]


def test_general_layouts_agree_with_transform_checkpoints(tmp_path):
    """Layouts beyond the glm2 pattern (2-d splits, a dim over two device axes, optimizer shards over
    middle or partial axes): our split of random tensors, merged by transform_checkpoints and by us,
    gives the original back."""
    rng = np.random.default_rng(3)
    cases = {
        "both_dims": ((2, 2, 2), (2, 0), 0, (16, 8)),
        "opt_right_axis": ((2, 2, 2), (1, -1), 2, (16, 8)),
        "opt_two_axes": ((2, 2, 2), (-1, 1), 4, (16, 8)),
        "opt_all": ((2, 2, 2), (-1,), 8, (16,)),
        "two_axes_one_dim": ((2, 2, 2), ((2, 1), -1), 0, (16, 8)),
        "opt_middle_axis": ((2, 2, 2), (0, 2), 2, (16, 8)),
        "opt_part_of_axis": ((4, 2), (0, -1), 2, (16, 8)),
    }
    full, layouts = {}, {}
    for name, (dev, tm, opt, shape) in cases.items():
        full[name] = rng.standard_normal(shape).astype(np.float32)
        layouts[name] = Layout(dev, tm).with_opt_shard(opt)
    full["global_step"] = np.array([3], np.int32)
    strat = str(tmp_path / "strategy.ckpt")
    write_strategy_file(strat, layouts)
    save_ms_checkpoint(full.items(), tmp_path / "full.ckpt")
    split_checkpoint(str(tmp_path / "full.ckpt"), strat, str(tmp_path / "ckpt"), progress=False)
    merge_shards(str(tmp_path / "ckpt"), strat, str(tmp_path / "ours.ckpt"), keep_optimizer=True, progress=False)
    assert_bits_equal(ours(tmp_path / "ours.ckpt"), full)
    import mindspore as ms
    ms.transform_checkpoints(str(tmp_path / "ckpt"), str(tmp_path / "ms_out"), "merged_", strat, None)
    assert_bits_equal(load_ms(tmp_path / "ms_out" / "rank_0" / "merged_0.ckpt"), full)


def test_pure_data_parallel_without_strategy(tmp_path):
    """Data parallel writes no strategy file: replicas are checked bit for bit and written once."""
    from convert.merge_shards import MergeError, merge_shards
    from convert.ms_ckpt import MSCheckpoint, save_ms_checkpoint

    rng = np.random.default_rng(3)
    weights = [("transformer.encoder.layers.0.self_attention.query_key_value.mindpet_delta_lora_a",
                rng.standard_normal((8, 64)).astype(np.float32)),
               ("adam_m.transformer.encoder.layers.0.self_attention.query_key_value.mindpet_delta_lora_a",
                rng.standard_normal((8, 64)).astype(np.float32))]
    for r in range(2):
        save_ms_checkpoint(weights, tmp_path / "ckpt" / f"rank_{r}" / "tiny-glm2-lora-1_4.ckpt")
    out = tmp_path / "merged.ckpt"
    summary = merge_shards(str(tmp_path / "ckpt"), None, str(out), progress=False)
    assert summary["ranks"] == 2 and summary["params"] == 1          # optimizer state dropped
    merged = MSCheckpoint(out)
    np.testing.assert_array_equal(merged.read(weights[0][0]), weights[0][1])
    save_ms_checkpoint([(weights[0][0], weights[0][1] + 1)], tmp_path / "ckpt" / "rank_1" / "tiny-glm2-lora-1_4.ckpt")
    with pytest.raises(MergeError, match="replica differs from rank 0"):
        merge_shards(str(tmp_path / "ckpt"), None, str(tmp_path / "bad.ckpt"), progress=False)
    assert not (tmp_path / "bad.ckpt").exists()


def _dp_run(root, ranks=2, prefix="tiny-glm2-lora", step=4, seed=3):
    """A pure data-parallel run's rank folders: every rank holds the same full tensors."""
    rng = np.random.default_rng(seed)
    weights = [("transformer.encoder.layers.0.self_attention.query_key_value.mindpet_delta_lora_b",
                rng.standard_normal((128, 8)).astype(np.float32))]
    for r in range(ranks):
        save_ms_checkpoint(weights, root / "ckpt" / f"rank_{r}" / f"{prefix}-1_{step}.ckpt")
    return dict(weights)


def _cli(root, *extra):
    out = root / "out" / "merged.ckpt"
    res = subprocess.run([sys.executable, SCRIPT, "--src", str(root / "ckpt"), "--output", str(out), "--quiet",
                          *extra], capture_output=True, text=True)
    return res, out


def test_empty_or_unreadable_rank_checkpoints_are_refused(tmp_path):
    _dp_run(tmp_path, step=4)
    _dp_run(tmp_path, step=8)
    newest = [tmp_path / "ckpt" / f"rank_{r}" / "tiny-glm2-lora-1_8.ckpt" for r in range(2)]
    open(newest[1], "wb").close()                       # one rank's newest cut to 0 bytes
    res, out = _cli(tmp_path)
    assert_clean_failure(res, out, str(newest[1]), "empty file (0 bytes)", "--step")
    open(newest[0], "wb").close()                       # every rank's newest
    res, out = _cli(tmp_path)
    assert_clean_failure(res, out, str(newest[0]), "empty file (0 bytes)")
    res, out = _cli(tmp_path, "--step", "4")            # the older step every rank holds still merges
    assert res.returncode == 0, res.stderr
    os.remove(out)
    for f in newest:
        os.remove(f)
        os.makedirs(f)                                  # a .ckpt that cannot be read as a file
    res, out = _cli(tmp_path)
    assert_clean_failure(res, out, str(newest[0]), "cannot read")


def test_strategy_splitting_data_parallel_replicas_is_refused(tmp_path):
    w = _dp_run(tmp_path)
    name = next(iter(w))
    strat = str(tmp_path / "strategy.ckpt")
    write_strategy_file(strat, {name: Layout((2,), (0, -1))})  # "dim 0 split over 2 devices"
    res, out = _cli(tmp_path, "--strategy", strat)
    assert_clean_failure(res, out, name, "rank_1", "same values as rank 0", "[256, 8]", "replicas",
                         "do not match")
    res, out = _cli(tmp_path)                           # without the strategy: one replica, checked
    assert res.returncode == 0, res.stderr
    assert MSCheckpoint(out).info(name)[0] == (128, 8)


def test_mixed_checkpoint_prefixes_are_refused(tmp_path):
    w = _dp_run(tmp_path, prefix="glm2-lora", step=4)
    _dp_run(tmp_path, prefix="other-run", step=6, seed=9)
    res, out = _cli(tmp_path)
    assert_clean_failure(res, out, "2 prefixes", "glm2-lora", "other-run", "--prefix")
    res, out = _cli(tmp_path, "--prefix", "glm2-lora")
    assert res.returncode == 0, res.stderr
    name = next(iter(w))
    np.testing.assert_array_equal(MSCheckpoint(out).read(name), w[name])
    res, out2 = _cli(tmp_path, "--prefix", "nope")
    assert res.returncode == 1 and "prefixes found: glm2-lora, other-run" in res.stderr
