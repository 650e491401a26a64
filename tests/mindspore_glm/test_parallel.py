"""Sharding strategies and their early checks.

MindSpore 2.9 cannot compile a sharded graph on this CPU-only machine: ``init()`` under msrun works
(gloo), but compiling under ``semi_auto_parallel`` stops with "Invalid communication backend: CPU for
semi_auto_parallel/auto_parallel mode, currently only support Ascend/GPU backend", and the dry-run
simulation (``MS_SIMULATION_LEVEL``) refuses CPU ("Dryrun is not supported on CPU device for a
distributed job"). The compile test is therefore marked ``ascend``.
"""
import numpy as np
import pytest
import mindspore as ms

from glm_common.config import ChatGLM2Config, preset
from mindspore_glm import ChatGLM2ForConditionalGeneration
from mindspore_glm.parallel import ParallelConfig, ParallelError, apply_sharding, check_parallel, sharding_plan
from tests.conftest import TINY_MODEL


def test_glm2_6b_layouts():
    cfg = preset("glm2_6b")
    for dp, mp in ((8, 1), (4, 2), (1, 2)):
        check_parallel(cfg, ParallelConfig(data_parallel=dp, model_parallel=mp), batch_size=8, device_num=dp * mp)
    with pytest.raises(ParallelError, match=r"model_parallel: 4 does not divide kv_groups \(multi_query_group_num\) 2"):
        check_parallel(cfg, ParallelConfig(model_parallel=4))
    with pytest.raises(ParallelError, match="model_parallel: 3 does not divide num_attention_heads 32"):
        check_parallel(cfg, ParallelConfig(model_parallel=3))


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


def test_sharded_model_still_runs_standalone():
    """Strategies only act under semi_auto_parallel; standalone the numbers are unchanged."""
    g = np.load(TINY_MODEL / "golden.npz")
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    apply_sharding(model, ParallelConfig(data_parallel=2, model_parallel=2), batch_size=2)
    ids = [ms.Tensor(g[k].astype(np.int32)) for k in ("batch_input_ids", "batch_attention_mask", "batch_position_ids")]
    mask = g["batch_attention_mask"] == 1
    assert np.abs(model(*ids).asnumpy() - g["batch_logits"])[mask].max() < 1e-4


@pytest.mark.ascend
def test_semi_auto_parallel_compiles():
    """On an Ascend host launched with 2 devices (msrun --worker_num=2): compile the sharded forward."""
    from mindspore.communication import init
    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=2)
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config.from_hf(TINY_MODEL))
    apply_sharding(model, ParallelConfig(model_parallel=2), batch_size=2, device_num=2)
    model.compile(ms.Tensor(np.ones((2, 8), np.int32)))
