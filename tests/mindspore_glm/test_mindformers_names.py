"""Checkpoints of this backend load into mindformers' ChatGLM2ForConditionalGeneration and back
(mindformers' model builds on CPU; its forward needs Ascend kernels, so names and shapes are compared)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from glm_common.config import ChatGLM2Config
from mindspore_glm import ChatGLM2ForConditionalGeneration
from mindspore_glm.lora import apply_lora
from tests.conftest import TINY_MODEL

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
mf_glm2 = pytest.importorskip("mindformers.models.glm2")
pytestmark = pytest.mark.mindformers


def _mf_model(cfg: ChatGLM2Config):
    mf_cfg = mf_glm2.ChatGLM2Config(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, kv_channels=cfg.kv_channels,
        multi_query_attention=cfg.multi_query_attention, multi_query_group_num=cfg.multi_query_group_num,
        padded_vocab_size=cfg.padded_vocab_size, vocab_size=cfg.padded_vocab_size, seq_length=32,
        add_qkv_bias=cfg.add_qkv_bias, add_bias_linear=cfg.add_bias_linear, param_init_type="float32",
        compute_dtype="float32", layernorm_compute_type="float32", batch_size=1)
    return mf_glm2.ChatGLM2ForConditionalGeneration(mf_cfg)


def _is_buffer(name):
    return ".paged_attention_mgr." in name


@pytest.fixture(scope="module")
def models():
    cfg = ChatGLM2Config.from_hf(TINY_MODEL)
    return ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), _mf_model(cfg), cfg


def test_ours_into_mindformers(models, tmp_path):
    ours, mf, _ = models
    path = ours.save_pretrained(tmp_path)
    not_loaded, unexpected = ms.load_param_into_net(mf, ms.load_checkpoint(path))
    assert [n for n in not_loaded if not _is_buffer(n)] == []
    assert unexpected == []
    mf_params = {p.name: p for p in mf.get_parameters()}
    for p in ours.get_parameters():
        np.testing.assert_array_equal(mf_params[p.name].asnumpy(), p.asnumpy())


def test_mindformers_into_ours(models, tmp_path):
    _, mf, cfg = models
    rng = np.random.default_rng(0)
    params = [p for p in mf.get_parameters() if not _is_buffer(p.name)]
    for p in params:
        p.set_data(Tensor(rng.normal(size=p.shape).astype(np.float32)))
    path = str(tmp_path / "mf.ckpt")
    ms.save_checkpoint(mf, path)   # buffers included, as mindformers writes them
    cfg.save_hf(tmp_path)
    ours = ChatGLM2ForConditionalGeneration.from_pretrained(path)
    mine = {p.name: p for p in ours.get_parameters()}
    assert set(mine) == {p.name for p in params}
    for p in params:
        np.testing.assert_array_equal(mine[p.name].asnumpy(), p.asnumpy())


def test_lora_names_match_mindpet(models):
    """mindformers' LoraAdapter on its glm2 model gives the same LoRA names and shapes as apply_lora."""
    _, _, cfg = models
    from mindformers.pet.tuners.lora_adapter import LoraAdapter
    mf = LoraAdapter.get_pet_model(_mf_model(cfg), {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                                                     "lora_dropout": 0.0, "target_modules": ".*query_key_value"})
    theirs = {p.name: tuple(p.shape) for p in mf.get_parameters() if "mindpet_delta_lora" in p.name}
    ours = ChatGLM2ForConditionalGeneration(cfg)
    apply_lora(ours, r=4, lora_alpha=8, lora_dropout=0.0)
    mine = {p.name: tuple(p.shape) for p in ours.get_parameters() if "mindpet_delta_lora" in p.name}
    assert theirs and mine == theirs
