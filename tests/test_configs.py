"""The shipped YAML run configs describe the models they claim to (architecture via the shared reader)."""
import glob
import os

import pytest
import yaml

from glm_common.config import ChatGLM2Config, preset
from tests.conftest import ROOT

GLM2 = sorted(glob.glob(os.path.join(ROOT, "configs", "glm2", "*.yaml")))
TINY = sorted(glob.glob(os.path.join(ROOT, "configs", "tiny", "*.yaml")))


def _model_config(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)["model"]["model_config"]


def test_every_glm2_run_has_a_tiny_twin():
    assert {os.path.basename(p).replace("run_glm2_6b_", "") for p in GLM2} == \
           {os.path.basename(p).replace("run_tiny_", "") for p in TINY} == \
           {"finetune.yaml", "lora.yaml", "ptuning2.yaml", "lora_eval.yaml"}


@pytest.mark.parametrize("path", GLM2, ids=os.path.basename)
def test_glm2_configs_are_chatglm2_6b(path):
    cfg, run = ChatGLM2Config.from_model_config(_model_config(path), source=path)
    full = preset("glm2_6b")
    assert cfg.replace(seq_length=full.seq_length, pre_seq_len=None) == full
    assert (run.param_init_type, run.compute_dtype, run.layernorm_compute_type) == ("float16", "float16", "float32")


@pytest.mark.parametrize("path", TINY, ids=os.path.basename)
def test_tiny_configs_are_the_golden_tiny_model(path):
    cfg, run = ChatGLM2Config.from_model_config(_model_config(path), source=path)
    assert cfg.replace(seq_length=256, pre_seq_len=None) == preset("tiny")
    assert run.compute_dtype == "float32"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for rel in ("tests/fixtures/data/adgen/train.json", "tests/fixtures/tokenizer/tiny_glm2_sp.model"):
        assert rel in text and os.path.exists(os.path.join(ROOT, rel))
