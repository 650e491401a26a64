"""Parameter-name map: HF <-> mindformers (checked against mindformers' own ChatGLM2 class) and LoRA names."""
import pytest

from glm_common import names
from glm_common.config import ChatGLM2Config, preset
from tests.conftest import TINY_MODEL, TINY_PTUNING_MODEL


def _golden_shapes(path):
    from convert.hf_layout import HFCheckpoint
    ckpt = HFCheckpoint(path)
    return {n: ckpt.info(n)[0] for n in ckpt.names if not names.is_derived_buffer(n)}


@pytest.mark.parametrize("path", [TINY_MODEL, TINY_PTUNING_MODEL], ids=lambda p: p.name)
def test_hf_param_shapes_match_golden_checkpoint(path):
    assert names.hf_param_shapes(ChatGLM2Config.from_hf(path)) == _golden_shapes(path)


def test_prefix_projection_shapes():
    c = preset("tiny", pre_seq_len=4, prefix_projection=True)
    s = names.hf_param_shapes(c)
    kv = c.prefix_kv_size
    assert s[names.HF_PREFIX_EMBEDDING] == (4, kv)
    assert s["transformer.prefix_encoder.trans.0.weight"] == (c.hidden_size, kv)
    assert s["transformer.prefix_encoder.trans.2.weight"] == (kv, c.hidden_size)


def test_hf_ms_round_trip():
    for name in names.hf_param_shapes(preset("tiny", pre_seq_len=4, prefix_projection=True)):
        for naming in names.NAMINGS:
            assert names.ms_to_hf(names.hf_to_ms(name, naming)) == name
    assert names.hf_to_ms(names.HF_EMBEDDING) == "transformer.embedding.embedding_weight"
    assert names.hf_to_ms(names.HF_EMBEDDING, "legacy") == "transformer.embedding.embedding_table"
    with pytest.raises(names.NamingError, match="naming"):
        names.hf_to_ms(names.HF_EMBEDDING, "megatron")


def test_lora_names_both_ways():
    peft_key = "base_model.model.transformer.encoder.layers.3.self_attention.query_key_value.lora_A.weight"
    ms_key = "transformer.encoder.layers.3.self_attention.query_key_value.mindpet_delta_lora_a"
    assert names.peft_to_mindpet(peft_key) == ms_key
    assert names.mindpet_to_peft(ms_key) == peft_key
    live = "base_model.model.transformer.encoder.layers.3.self_attention.query_key_value.lora_B.default.weight"
    assert names.peft_to_mindpet(live) == ms_key[:-1] + "b"
    assert names.mindpet_to_peft(ms_key[:-1] + "b", adapter="default") == live
    assert names.lora_base_name(peft_key) == ("transformer.encoder.layers.3.self_attention.query_key_value", "A")
    assert names.hf_to_ms(peft_key) == ms_key and names.ms_to_hf(ms_key) == peft_key[len("base_model.model."):]
    with pytest.raises(names.NamingError):
        names.lora_base_name("transformer.output_layer.weight")


def test_split_layout_names():
    q = "transformer.encoder.layers.0.self_attention.query_key_value.bias"
    assert names.split_qkv_names(q) == tuple(q.replace("query_key_value", w) for w in ("wq", "wk", "wv"))
    m = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
    assert names.split_mlp_names(m) == (m.replace("dense_h_to_4h", "dense_left"), m.replace("dense_h_to_4h", "dense_right"))


@pytest.mark.mindformers
@pytest.mark.parametrize("concat", [True, False], ids=["concat", "split"])
def test_names_match_mindformers_class(concat):
    """The mindformers names our map produces are exactly the trainable parameters of mindformers' class."""
    from mindformers.models.glm2 import ChatGLM2Config as MFConfig, ChatGLM2ForConditionalGeneration as MFModel

    c = preset("tiny")
    mf = MFModel(MFConfig(num_layers=c.num_layers, padded_vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size,
                          ffn_hidden_size=c.ffn_hidden_size, kv_channels=c.kv_channels,
                          num_attention_heads=c.num_attention_heads, seq_length=64,
                          multi_query_group_num=c.multi_query_group_num, param_init_type="float32",
                          compute_dtype="float32", qkv_concat=concat, mlp_concat=concat))
    theirs = {p.name: tuple(p.shape) for p in mf.get_parameters() if not names.is_derived_buffer(p.name)}
    ours = {}
    for hf_name, shape in names.hf_param_shapes(c).items():
        ms_name = names.hf_to_ms(hf_name)
        if not concat and ".query_key_value." in ms_name:
            q, k, v = names.split_qkv_names(ms_name)
            kv = c.kv_groups * c.kv_channels
            ours.update({q: (c.projection_size,) + shape[1:], k: (kv,) + shape[1:], v: (kv,) + shape[1:]})
        elif not concat and ".dense_h_to_4h." in ms_name:
            left, right = names.split_mlp_names(ms_name)
            ours.update({left: (c.ffn_hidden_size,) + shape[1:], right: (c.ffn_hidden_size,) + shape[1:]})
        else:
            ours[ms_name] = shape
    assert ours == theirs
