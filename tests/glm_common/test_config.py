"""ChatGLM2Config: HF config.json and mindformers YAML in, HF out, presets, one-line errors."""
import json

import pytest
import yaml

from glm_common.config import ChatGLM2Config, ConfigError, RunOptions, preset
from tests.conftest import TINY_MODEL, TINY_PTUNING_MODEL

# The model section of mindformers' run_glm2_6b_finetune.yaml, as users have it (YAML 1.1 reads
# 1e-5 and None as strings: the reader must cope).
MINDFORMERS_YAML = """
model:
  model_config:
    type: ChatGLM2Config
    batch_size: 1
    num_layers: 28
    padded_vocab_size: 65024
    hidden_size: 4096
    ffn_hidden_size: 13696
    kv_channels: 128
    num_attention_heads: 32
    seq_length: 193
    hidden_dropout: 0.0
    attention_dropout: 0.0
    layernorm_epsilon: 1e-5
    rmsnorm: True
    apply_residual_connection_post_layernorm: False
    post_layer_norm: True
    add_bias_linear: False
    add_qkv_bias: True
    bias_dropout_fusion: True
    multi_query_attention: True
    multi_query_group_num: 2
    apply_query_key_layer_scaling: True
    attention_softmax_in_fp32: True
    fp32_residual_connection: False
    quantization_bit: 0
    pre_seq_len: None
    prefix_projection: False
    param_init_type: "float16"
    compute_dtype: "float16"
    layernorm_compute_type: "float32"
    use_past: False
    use_flash_attention: False
    eos_token_id: 2
    pad_token_id: 0
    repetition_penalty: 1.0
    max_decode_length: 256
    checkpoint_name_or_path: "glm2_6b"
    top_k: 1
    top_p: 1
    do_sample: True
  arch:
    type: ChatGLM2ForConditionalGeneration
"""


def test_hf_round_trip_is_exact(tmp_path):
    for src in (TINY_MODEL, TINY_PTUNING_MODEL):
        original = json.loads((src / "config.json").read_text())
        cfg = ChatGLM2Config.from_hf(src)
        assert cfg.to_hf_dict() == original
        cfg.save_hf(tmp_path / src.name)
        assert json.loads((tmp_path / src.name / "config.json").read_text()) == original
        assert ChatGLM2Config.from_hf(tmp_path / src.name) == cfg


def test_tiny_preset_is_the_golden_config():
    assert ChatGLM2Config.from_hf(TINY_MODEL) == preset("tiny")
    assert ChatGLM2Config.from_hf(TINY_PTUNING_MODEL) == preset("tiny", pre_seq_len=4)


def test_glm2_6b_preset_sizes():
    c = preset("glm2_6b")
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.padded_vocab_size) == (28, 4096, 13696, 65024)
    assert c.kv_groups == 2 and c.qkv_size == 4096 + 2 * 2 * 128 == 4608
    assert c.prefix_kv_size == 28 * 2 * 2 * 128
    with pytest.raises(ConfigError, match="unknown name 'glm3'"):
        preset("glm3")


def test_mindformers_yaml_model_config():
    data = yaml.safe_load(MINDFORMERS_YAML)
    cfg, opts = ChatGLM2Config.from_model_config(data["model"]["model_config"])
    assert cfg == preset("glm2_6b", seq_length=193, torch_dtype="float16")
    assert cfg.layernorm_epsilon == 1e-5 and cfg.pre_seq_len is None
    assert isinstance(opts, RunOptions)
    assert (opts.param_init_type, opts.compute_dtype, opts.layernorm_compute_type) == ("float16", "float16", "float32")
    assert opts.do_sample is True and opts.top_p == 1.0 and opts.max_decode_length == 256
    assert opts.ignored == {"checkpoint_name_or_path": "glm2_6b"}


def test_yaml_round_trip_through_model_config():
    cfg = preset("tiny", pre_seq_len=4)
    opts = RunOptions(param_init_type="float32", compute_dtype="bfloat16", use_past=True)
    text = yaml.safe_dump({"model": {"model_config": cfg.to_model_config(opts)}})
    again, again_opts = ChatGLM2Config.from_model_config(yaml.safe_load(text)["model"]["model_config"])
    assert again == cfg and again_opts == opts


def test_mindformers_yaml_errors():
    mc = yaml.safe_load(MINDFORMERS_YAML)["model"]["model_config"]
    with pytest.raises(ConfigError, match=r"^model.model_config.compute_dtype: expected one of"):
        ChatGLM2Config.from_model_config(dict(mc, compute_dtype="float64"))
    with pytest.raises(ConfigError, match=r"^model.model_config.mystery_switch: unknown model_config key"):
        ChatGLM2Config.from_model_config(dict(mc, mystery_switch=1))
    with pytest.raises(ConfigError, match=r"^model.model_config: hidden_size: expected an integer"):
        ChatGLM2Config.from_model_config(dict(mc, hidden_size="big"))


def _write(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("field,value,expect", [
    ("hidden_size", "64", "hidden_size: expected an integer, got '64'"),
    ("multi_query_attention", "yes", "multi_query_attention: expected true or false"),
    ("layernorm_epsilon", None, "layernorm_epsilon: expected a number"),
    ("num_layers", True, "num_layers: expected an integer"),
    ("pre_seq_len", 1.5, "pre_seq_len: expected an integer or null"),
    ("num_layers", 0, "num_layers: must be a positive integer"),
    ("multi_query_group_num", 3, "multi_query_group_num: 3 does not divide num_attention_heads 4"),
    ("kv_channels", 18, "kv_channels: must be a multiple of 4"),
])
def test_config_json_wrong_type_or_value(tmp_path, field, value, expect):
    data = json.loads((TINY_MODEL / "config.json").read_text())
    data[field] = value
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        ChatGLM2Config.from_hf(path)
    msg = str(e.value)
    assert msg == f"{path}: {expect}" or msg.startswith(f"{path}: {expect}")
    assert "\n" not in msg


@pytest.mark.parametrize("field", ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                   "kv_channels", "padded_vocab_size"])
def test_config_json_missing_field(tmp_path, field):
    data = json.loads((TINY_MODEL / "config.json").read_text())
    del data[field]
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        ChatGLM2Config.from_hf(tmp_path)
    assert str(e.value) == f"{path}: {field}: missing (required field)"


def test_config_json_not_json_or_absent(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "num_layers": 2,\n  oops\n}')
    with pytest.raises(ConfigError, match=r"config.json:3: not valid JSON"):
        ChatGLM2Config.from_hf(path)
    with pytest.raises(ConfigError, match="no such file"):
        ChatGLM2Config.from_hf(tmp_path / "absent")
    data = json.loads((TINY_MODEL / "config.json").read_text())
    data["model_type"] = "llama"
    _write(tmp_path, data)
    with pytest.raises(ConfigError, match="model_type: expected 'chatglm'"):
        ChatGLM2Config.from_hf(tmp_path)


def test_unsupported_switches_are_refused():
    for field, value in (("original_rope", False), ("rmsnorm", False), ("quantization_bit", 4),
                         ("apply_residual_connection_post_layernorm", True)):
        with pytest.raises(ConfigError, match=field):
            preset("tiny", **{field: value})


def test_extra_keys_survive(tmp_path):
    data = json.loads((TINY_MODEL / "config.json").read_text())
    data["auto_map"] = {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    cfg = ChatGLM2Config.from_dict(data)
    assert cfg.extra["auto_map"] == data["auto_map"]
    assert cfg.to_hf_dict()["auto_map"] == data["auto_map"]
