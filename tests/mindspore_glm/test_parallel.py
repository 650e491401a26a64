"""Scale-out through MindSpore's parallel engine: everything up to graph compilation, on CPU.

MindSpore 2.9 compiles semi-auto-parallel graphs only on Ascend/GPU ("Invalid backend: CPU"), runs the
optimizer shard only on Ascend and its dry run needs the Ascend software stack. So these tests read back
what MindSpore will compile with: the auto-parallel context (``mindspore.get_auto_parallel_context``),
the strategy of every sharded operator, the pipeline stage of every layer and the recompute flags, for
each layout (dp8; dp2 x mp4; dp2 x mp2 x pp2; with and without optimizer shard) on the 6B YAML (its
model built without materialising its weights) and the tiny one. Recompute itself runs on CPU (GRAPH
mode): gradients with and without it are compared, and the peak memory of a training step measured. The runs on Ascend are in ``test_parallel_ascend.py``.
"""
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import ops

from glm_common.config import ChatGLM2Config, preset
from glm_common.parallel_keys import SELECT_RECOMPUTE_DEFAULT
from glm_common.run_config import RunConfigWarning, load_run_config, settings_from_config
from mindspore_glm import ChatGLM2ForConditionalGeneration
from mindspore_glm.parallel import (ParallelConfig, ParallelError, apply_sharding, check_parallel, check_scaleout,
                                    configure_model, context_kwargs, dataset_split, init_parallel, layer_stages,
                                    operator_strategies, pipeline_stage_map, recompute_flags, sharding_plan)
from mindspore_glm.train_step import TrainOneStepCell, _expand_grad_scale, make_optimizer, sum_squares
from tests.conftest import ROOT, TINY_MODEL

YAMLS = {"6b": ROOT / "configs" / "glm2" / "run_glm2_6b_finetune.yaml",
         "tiny": ROOT / "configs" / "tiny" / "run_tiny_finetune.yaml"}
#: (data_parallel, model_parallel, pipeline_stage, micro_batch_num)
LAYOUTS = {"dp8": (8, 1, 1, 1), "dp2xmp4": (2, 4, 1, 1), "dp2xmp2xpp2": (2, 2, 2, 2)}


@pytest.fixture(autouse=True)
def _clean_context():
    ms.reset_auto_parallel_context()
    yield
    ms.reset_auto_parallel_context()


def semi_auto_yaml(which, layout, opt_shard, recompute=True, device="Ascend"):
    cfg = load_run_config(str(YAMLS[which]))
    dp, mp, pp, micro = LAYOUTS[layout]
    cfg["use_parallel"] = True
    cfg["context"]["device_target"] = device
    cfg["parallel"] = {"parallel_mode": 1, "gradients_mean": False, "full_batch": True,
                       "search_mode": "sharding_propagation", "loss_repeated_mean": True,
                       "enable_parallel_optimizer": opt_shard,
                       "parallel_optimizer_config": {"gradient_accumulation_shard": False,
                                                     "parallel_optimizer_threshold": 64},
                       "strategy_ckpt_config": {"save_file": "./ckpt_strategy.ckpt"}}
    cfg["parallel_config"] = {"data_parallel": dp, "model_parallel": mp, "pipeline_stage": pp,
                              "micro_batch_num": micro, "vocab_emb_dp": True, "gradient_aggregation_group": 4}
    cfg["recompute_config"] = {"recompute": recompute, "mp_comm_recompute": True,
                               "parallel_optimizer_comm_recompute": False, "recompute_slice_activation": False}
    return cfg


def settings(cfg, source="run.yaml"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunConfigWarning)
        return settings_from_config(cfg, source)


def build_lazy(config):
    """The model's structure with parameters that are never materialised (MindSpore's lazy initializer):
    the 6B layout is checked without 25 GB of weights."""
    from mindspore.common.initializer import initializer
    import mindspore_glm.model as M
    keep = M._zeros
    M._zeros = lambda shape, dtype: initializer("zeros", shape, dtype)
    try:
        return ChatGLM2ForConditionalGeneration(config)
    finally:
        M._zeros = keep


_MODELS = {}


def model_for(which):
    # one build per config for the whole module; every test re-applies its own layout onto it
    if which not in _MODELS:
        cfg = preset("glm2_6b") if which == "6b" else ChatGLM2Config.from_hf(TINY_MODEL)
        _MODELS[which] = build_lazy(cfg)
    return _MODELS[which]


# ------------------------------------------------------------------------------------------- checks
def test_glm2_6b_layouts():
    cfg = preset("glm2_6b")
    for dp, mp in ((8, 1), (4, 2), (2, 4), (1, 8)):
        check_parallel(cfg, ParallelConfig(data_parallel=dp, model_parallel=mp), batch_size=8 * dp,
                       device_num=dp * mp)
    with pytest.raises(ParallelError, match="model_parallel: 3 does not divide num_attention_heads 32"):
        check_parallel(cfg, ParallelConfig(model_parallel=3))
    with pytest.raises(ParallelError, match="model_parallel: 64 does not divide num_attention_heads 32"):
        check_parallel(cfg, ParallelConfig(model_parallel=64))


def test_checks_fail_early():
    cfg = ChatGLM2Config.from_hf(TINY_MODEL)
    with pytest.raises(ParallelError, match="data_parallel: 4 does not divide batch_size 6"):
        check_parallel(cfg, ParallelConfig(data_parallel=4), batch_size=6)
    with pytest.raises(ParallelError, match="= 4 devices, but 8 are available"):
        check_parallel(cfg, ParallelConfig(data_parallel=2, model_parallel=2), device_num=8)
    with pytest.raises(ParallelError, match=r"parallel_config.model_parallel: must be a positive integer, got 0"):
        check_parallel(cfg, ParallelConfig(model_parallel=0))
    with pytest.raises(ParallelError, match="pipeline_stage: 3 stages for 2 layers"):
        check_parallel(cfg, ParallelConfig(pipeline_stage=3))
    with pytest.raises(ParallelError, match="micro_batch_num: 1 is less than pipeline_stage 2"):
        check_parallel(cfg, ParallelConfig(pipeline_stage=2))
    model = ChatGLM2ForConditionalGeneration(cfg)
    with pytest.raises(ParallelError, match="does not divide batch_size 3"):
        apply_sharding(model, ParallelConfig(data_parallel=2), batch_size=3)


def test_plan_is_the_glm2_pattern():
    cfg = ChatGLM2Config.from_hf(TINY_MODEL)
    plan = sharding_plan(cfg, ParallelConfig(data_parallel=2, model_parallel=2, vocab_emb_dp=False))
    assert plan["self_attention.query_key_value.matmul"] == ((2, 1), (2, 1))   # weight [out, in]: out axis
    assert plan["mlp.dense_h_to_4h.matmul"] == ((2, 1), (2, 1))
    assert plan["self_attention.dense.matmul"] == ((2, 2), (1, 2))             # in axis
    assert plan["mlp.dense_4h_to_h.matmul"] == ((2, 2), (1, 2))
    assert plan["transformer.output_layer.matmul"] == ((2, 1), (2, 1))         # vocab axis
    assert plan["transformer.embedding.gather"] == ((2, 1), (2, 1))


@pytest.mark.parametrize("mp", [2, 4])
def test_sharded_model_still_runs_standalone(mp):
    """Strategies only act under semi_auto_parallel; standalone the numbers are the golden ones, also with
    model_parallel 4 > 2 key/value groups (each head reads its own copy of its group)."""
    g = np.load(TINY_MODEL / "golden.npz")
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    apply_sharding(model, ParallelConfig(data_parallel=1, model_parallel=mp), batch_size=2)
    assert model.transformer.encoder.layers[0].self_attention.kv_repeat == (1 if mp == 2 else 2)
    ids = [ms.Tensor(g[k].astype(np.int32)) for k in ("batch_input_ids", "batch_attention_mask", "batch_position_ids")]
    mask = g["batch_attention_mask"] == 1
    assert np.abs(model(*ids).asnumpy() - g["batch_logits"])[mask].max() < 1e-4


# ------------------------------------------------------------------------------------------- layouts
def _expected_context(s, dp, mp, pp, opt_shard):
    return {"parallel_mode": "semi_auto_parallel", "device_num": dp * mp * pp, "full_batch": True,
            "search_mode": "sharding_propagation", "loss_repeated_mean": True, "gradients_mean": False,
            "pipeline_stages": pp, "enable_parallel_optimizer": opt_shard}


@pytest.mark.parametrize("opt_shard", [False, True], ids=["no_opt_shard", "opt_shard"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("which", ["6b", "tiny"])
def test_layout_reads_back(tmp_path, which, layout, opt_shard):
    dp, mp, pp, micro = LAYOUTS[layout]
    cfg = semi_auto_yaml(which, layout, opt_shard)
    cfg["output_dir"] = str(tmp_path)
    s = settings(cfg)
    world = dp * mp * pp
    init_parallel(s, world, rank=3)
    for key, value in _expected_context(s, dp, mp, pp, opt_shard).items():
        assert ms.get_auto_parallel_context(key) == value, key
    assert ms.get_auto_parallel_context("strategy_ckpt_config")["save_file"] == \
        str(tmp_path / "strategy" / "ckpt_strategy_rank_3.ckpt")
    from mindspore.parallel._auto_parallel_context import auto_parallel_context
    if opt_shard:
        assert auto_parallel_context().get_parallel_optimizer_threshold() == 64
        assert auto_parallel_context().get_grad_accumulation_shard() is False

    model = model_for(which)
    done = configure_model(model, s)
    n = model.config.num_layers
    # every sharded operator's strategy, as MindSpore holds it
    got = operator_strategies(model)
    kv_mp = mp if model.config.kv_groups % mp == 0 else 1
    want = {"transformer.embedding.gather": ((1, 1), (dp, 1)),
            "transformer.output_layer.matmul": ((dp, 1), (mp, 1))}
    for i in range(n):
        p = f"transformer.encoder.layers.{i}."
        want.update({p + "self_attention.query_key_value.matmul": ((dp, 1), (mp, 1)),
                     p + "mlp.dense_h_to_4h.matmul": ((dp, 1), (mp, 1)),
                     p + "self_attention.dense.matmul": ((dp, mp), (1, mp)),
                     p + "mlp.dense_4h_to_h.matmul": ((dp, mp), (1, mp)),
                     p + "self_attention.bmm_t": ((dp, mp, 1, 1), (dp, mp, 1, 1)),
                     p + "self_attention.bmm": ((dp, mp, 1, 1), (dp, mp, 1, 1))})
        attn = model.transformer.encoder.layers[i].self_attention
        assert attn.kv_repeat == (1 if kv_mp == mp else model.config.num_attention_heads // model.config.kv_groups)
    assert {k: got[k] for k in want} == want
    assert done["plan"]["self_attention.flash_attention"][1] == (dp, mp, 1, 1)   # kv_repeat copies when mp > groups
    # pipeline stages: mindformers' split, the ends on the first and last stage
    stages = pipeline_stage_map(model)
    per = max((n + 1) // pp, 1)
    assert [stages[f"transformer.encoder.layers.{i}"] for i in range(n)] == [min(i // per, pp - 1) for i in range(n)]
    assert stages["transformer.embedding"] == 0
    assert stages["transformer.output_layer"] == stages["transformer.encoder.final_layernorm"] == pp - 1
    if which == "6b" and pp == 2:
        assert stages["transformer.encoder.layers.13"] == 0 and stages["transformer.encoder.layers.14"] == 1
    # recompute: every layer, with model-parallel communication recomputed
    assert all(recompute_flags(model).values()) and len(done["recompute"]) == n
    attn0 = model.transformer.encoder.layers[0].self_attention
    assert attn0.query_key_value.matmul.attrs.get("recompute_comm_op") is True
    # optimizer fusion groups (gradient_aggregation_group 4): 2 under pipeline, else layer // ((n+1)//4) + 1
    fusion = [next(iter(model.transformer.encoder.layers[i].get_parameters())).comm_fusion for i in range(n)]
    assert fusion == ([2] * n if pp > 1 else [i // max((n + 1) // 4, 1) + 1 for i in range(n)])
    # data: with full_batch every rank reads the global batch
    assert dataset_split(s, 3, world) == (0, 1, s.batch_size * dp * (micro if pp > 1 else 1))


def test_recompute_off_leaves_layers_alone():
    s = settings(semi_auto_yaml("tiny", "dp8", False, recompute=False))
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config.from_hf(TINY_MODEL))
    assert configure_model(model, s)["recompute"] == [] and not any(recompute_flags(model).values())


def test_data_parallel_context_and_optimizer_shard():
    """parallel_mode 0 (mindformers' LoRA YAML): data parallel, the optimizer shard honoured on Ascend."""
    cfg = semi_auto_yaml("tiny", "dp8", True)
    cfg["parallel"]["parallel_mode"] = 0
    cfg["parallel_config"]["model_parallel"] = 1
    s = settings(cfg)
    init_parallel(s, 8)
    assert ms.get_auto_parallel_context("parallel_mode") == "data_parallel"
    assert ms.get_auto_parallel_context("enable_parallel_optimizer") is True
    # on CPU the optimizer shard cannot run: not set, and named in the one "ignored" warning
    cfg["context"]["device_target"] = "CPU"
    with pytest.warns(RunConfigWarning, match=r"parallel.enable_parallel_optimizer \(MindSpore's optimizer shard"):
        s = settings_from_config(cfg, "lora.yaml")
    assert "enable_parallel_optimizer" not in context_kwargs(s, 8)


# ------------------------------------------------------------------------------------------- the runner
def _main(args, capsys):
    from mindspore_glm.run import main
    rc = main(args)
    return rc, capsys.readouterr().err


def _write(tmp_path, cfg, name="run.yaml"):
    import yaml
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("key,value,message", [
    ("model_parallel", 3, "parallel_config.model_parallel: 3 does not divide num_attention_heads 32"),
    ("pipeline_stage", 29, "parallel_config.pipeline_stage: 29 stages for 28 layers"),
    ("data_parallel", 3, "parallel_config: data_parallel 3 x model_parallel 1 x pipeline_stage 1 = 3 devices, "
                         "but 8 are available"),       # RANK_SIZE from the launcher
])
def test_bad_layout_is_one_line_before_anything_is_built(tmp_path, capsys, monkeypatch, key, value, message):
    cfg = semi_auto_yaml("6b", "dp8", True)
    cfg["parallel_config"][key] = value
    cfg["output_dir"] = str(tmp_path / "out")
    if key == "data_parallel":
        monkeypatch.setenv("RANK_SIZE", "8")
    else:
        monkeypatch.delenv("RANK_SIZE", raising=False)
    import mindspore_glm.train as T
    monkeypatch.setattr(T, "build_model", lambda *a, **k: pytest.fail("built a model"))
    monkeypatch.setattr(T, "set_context", lambda *a, **k: pytest.fail("set a device context"))
    rc, err = _main(["--config", _write(tmp_path, cfg), "--run_mode", "finetune"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_semi_auto_on_cpu_stops_with_one_line(tmp_path, capsys):
    cfg = semi_auto_yaml("tiny", "dp2xmp2xpp2", True, device="CPU")
    cfg["output_dir"] = str(tmp_path / "out")
    rc, err = _main(["--config", _write(tmp_path, cfg), "--run_mode", "finetune"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and "parallel.parallel_mode: 1 (semi-auto parallel) needs Ascend" in lines[0]
    assert "use_parallel: False" in lines[0] and "Traceback" not in err


def test_the_same_yaml_trains_on_one_device_without_use_parallel(tmp_path):
    """A semi-auto dp2 x mp2 x pp2 YAML with recompute, use_parallel False: trains on this CPU."""
    from tests.mindspore_glm.test_train import run_config
    from mindspore_glm.train import train
    base = run_config(tmp_path, "full", 1e-3, rows=8, epochs=1, batch=4)
    cfg = semi_auto_yaml("tiny", "dp2xmp2xpp2", True, device="CPU")
    for k in ("parallel", "parallel_config", "recompute_config"):
        base[k] = cfg[k]
    base["use_parallel"] = False
    s = settings(base)
    out = train(s)
    assert out["steps"] == 2 and all(np.isfinite(out["losses"]))
    assert all(recompute_flags(out["model"]).values())


# ------------------------------------------------------------------------------------------- recompute on CPU
class _Grads(ms.nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.weights = ms.ParameterTuple(model.trainable_params())
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, ids, labels):
        return self.grad(lambda x, y: self.model(x, None, None, y)[0], self.weights)(ids, labels)


def test_recompute_gradients_equal():
    """GRAPH mode: every GLMBlock recomputed, or only each layer's MLP (``select_recompute: True``), gives
    the gradients of the plain model (<= 1e-6 relative)."""
    from glm_common.run_config import TrainSettings
    cfg = ChatGLM2Config.from_hf(TINY_MODEL)
    rng = np.random.default_rng(0)
    ids = ms.Tensor(rng.integers(5, cfg.padded_vocab_size, (2, 24)).astype(np.int32))
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        grads = {}
        for flag in (False, True, "select"):
            model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
            s = TrainSettings(config=cfg)
            s.gradient_checkpointing = flag is True
            if flag == "select":
                s.scaleout = {"recompute": {"select_recompute": SELECT_RECOMPUTE_DEFAULT}}
            done = configure_model(model, s)
            assert len(done["recompute"]) == (cfg.num_layers if flag is True else 0)
            assert done["select_recompute"] == ([f"transformer.encoder.layers.{i}.{c}" for i in range(cfg.num_layers)
                                                 for c in ("self_attention", "mlp")] if flag == "select" else [])
            grads[flag] = [g.asnumpy() for g in _Grads(model)(ids, ids)]
    finally:
        ms.set_context(mode=mode)
    for side in (True, "select"):
        for a, b in zip(grads[side], grads[False]):
            assert np.abs(a - b).max() <= 1e-6 * max(np.abs(b).max(), 1e-12)


def test_select_recompute_true_is_attention_and_mlp_and_a_name_matching_nothing_is_refused():
    """``select_recompute: True`` recomputes attention and the MLP of every layer (mindformers); a list
    with a name that matches no cell of a layer is a one-line error naming the key."""
    from glm_common.run_config import TrainSettings
    cfg = load_run_config(str(YAMLS["tiny"]))
    cfg["recompute_config"] = {"recompute": False, "select_recompute": True}
    assert settings(cfg).scaleout["recompute"]["select_recompute"] == ("self_attention", "mlp")
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    s = TrainSettings(config=model.config)
    s.scaleout = {"recompute": {"select_recompute": ("mlp", "feed_forward")}}
    with pytest.raises(ParallelError, match=r"^recompute_config.select_recompute: 'feed_forward' matches no cell "
                                            r"of a layer \(they are input_layernorm, self_attention, "):
        configure_model(model, s)


def test_search_mode_is_named_as_without_effect_in_semi_auto():
    cfg = semi_auto_yaml("tiny", "dp8", False)
    with pytest.warns(RunConfigWarning, match=r"parallel.search_mode \(MindSpore reads it only in auto-parallel"):
        settings_from_config(cfg, "run.yaml")


def test_only_trainable_params_defaults_true_as_in_mindspore(tmp_path):
    """The strategy file of a semi-auto run lists the trained parameters only unless the YAML says
    otherwise (MindSpore's default), so a LoRA run's strategy matches its shards."""
    cfg = semi_auto_yaml("tiny", "dp8", False)
    cfg["output_dir"] = str(tmp_path)
    init_parallel(settings(cfg), 8)
    assert ms.get_auto_parallel_context("strategy_ckpt_config")["only_trainable_params"] is True
    cfg["parallel"]["strategy_ckpt_config"]["only_trainable_params"] = False
    ms.reset_auto_parallel_context()
    init_parallel(settings(cfg), 8)
    assert ms.get_auto_parallel_context("strategy_ckpt_config")["only_trainable_params"] is False


def test_layer_stages_formula():
    assert layer_stages(28, 2) == [0] * 14 + [1] * 14
    assert layer_stages(28, 4) == [0] * 7 + [1] * 7 + [2] * 7 + [3] * 7
    assert layer_stages(2, 2) == [0, 1]


class _SumSquares(ms.nn.Cell):
    def __init__(self, sliced):
        super().__init__()
        self.sliced = sliced

    def construct(self, a, b, c):
        return sum_squares((a, b, c), self.sliced)


def test_sliced_gradient_norm():
    """The gradient norm of a semi-auto run: each gradient's square sum through MindSpore's ``grad_scale``
    ExpandDims (summed over the devices holding slices); on one device it is the plain sum (float64 numpy
    reference), and the semi-auto train step uses it."""
    assert _expand_grad_scale.attrs.get("grad_scale") is True
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=s).astype(np.float32) for s in ((7, 5), (11,), (3, 4, 6))]
    want = sum(float((x.astype(np.float64) ** 2).sum()) for x in xs)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        for sliced in (False, True):
            got = float(_SumSquares(sliced)(*[ms.Tensor(x) for x in xs]).asnumpy())
            assert abs(got - want) <= 1e-6 * want, (sliced, got, want)
    finally:
        ms.set_context(mode=mode)
    for semi in (False, True):
        cfg = semi_auto_yaml("tiny", "dp2xmp2xpp2", False, recompute=False) if semi else \
            load_run_config(str(YAMLS["tiny"]))
        if semi:
            cfg["parallel_config"].update(pipeline_stage=1, micro_batch_num=1)
        s = settings(cfg)
        model = ChatGLM2ForConditionalGeneration(ChatGLM2Config.from_hf(TINY_MODEL))
        params = list(model.trainable_params())
        cell = TrainOneStepCell(model, make_optimizer(params, s, np.full(4, 1e-4, np.float32)), s)
        assert cell.sliced_grads is semi


@pytest.mark.slow
def test_recompute_changes_memory_not_numbers():
    """bench/bench_recompute.py as a user runs it, on a tiny model (``make bench`` runs it at its real size
    and reports the memory ratios): the GRAPH train step with every layer recomputed and with the MLPs
    recomputed gives the same losses and gradient norms as without."""
    import re
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_recompute.py"), "--layers", "2", "--hidden", "64",
                        "--seq", "32", "--batch", "2", "--steps", "2"], capture_output=True, text=True, cwd=str(ROOT),
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    diffs = re.findall(r"losses ([0-9.e+-]+), gradient norms ([0-9.e+-]+)", r.stdout)
    assert len(diffs) == 2, r.stdout
    assert all(float(a) == 0 and float(b) == 0 for a, b in diffs), r.stdout
