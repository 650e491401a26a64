"""Adapters validated like weights: alpha above 0 and numeric, targets ChatGLM2 has, layers in range, A/B
shapes that fit the rank and the layer, finite values; DoRA refused. Each refusal: exit 1, one line naming
the file and the field or module, nothing written, the inputs unchanged."""
import json
import os

import numpy as np
import pytest
import yaml

from convert import adapters
from convert.hf_layout import write_tiny_hf_dir
from convert.ms_ckpt import save_ms_checkpoint
from convert.safetensors_io import save_safetensors
from glm_common import names as N
from glm_common.config import ChatGLM2Config
from tests.conftest import TINY_MODEL
from tests.convert.test_outputs import refused, tree_hash

CFG = ChatGLM2Config.from_hf(TINY_MODEL)
R = 2
QKV = "transformer.encoder.layers.0.self_attention.query_key_value"


def _pairs(modules=(QKV,)):
    shapes = N.hf_param_shapes(CFG)
    rng = np.random.default_rng(0)
    out = {}
    for m in modules:
        o, i = shapes[m + ".weight"]
        out[m] = (rng.standard_normal((R, i)).astype(np.float32), rng.standard_normal((o, R)).astype(np.float32))
    return out


def make_adapter(d, pairs=None, base=str(TINY_MODEL), **cfg):
    os.makedirs(d, exist_ok=True)
    pairs = _pairs() if pairs is None else pairs
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["query_key_value"],
              "base_model_name_or_path": base, **cfg}
    json.dump(config, open(os.path.join(d, "adapter_config.json"), "w"))
    tensors = []
    for m, (a, b) in pairs.items():
        tensors += [(f"{N.PEFT_PREFIX}{m}.lora_A.weight", a), (f"{N.PEFT_PREFIX}{m}.lora_B.weight", b)]
    save_safetensors(tensors, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
    return str(d)


def peft_to_ms_refuses(capsys, tmp_path, adapter, *words, extra=()):
    out = tmp_path / "lora.ckpt"
    before = tree_hash(adapter)
    refused(capsys, adapters.main(["peft-to-ms", "--adapter", adapter, "--output", str(out), *extra]), *words)
    assert tree_hash(adapter) == before
    assert not out.exists() and not (tmp_path / "lora_pet_config.yaml").exists()


def test_a_valid_adapter_converts(tmp_path):
    adapter = make_adapter(tmp_path / "ok")
    assert adapters.main(["peft-to-ms", "--adapter", adapter, "--output", str(tmp_path / "lora.ckpt")]) == 0


@pytest.mark.parametrize("alpha", [0, -4, "32", True, float("nan")])
def test_alpha_must_be_a_number_above_zero(tmp_path, capsys, alpha):
    adapter = make_adapter(tmp_path / "a", lora_alpha=alpha)
    peft_to_ms_refuses(capsys, tmp_path, adapter, "adapter_config.json", "lora_alpha")


def test_dora_refused(tmp_path, capsys):
    peft_to_ms_refuses(capsys, tmp_path, make_adapter(tmp_path / "a", use_dora=True), "adapter_config.json",
                       "use_dora")


@pytest.mark.parametrize("targets,word", [(["query_key_valu"], "did you mean 'query_key_value'"),
                                          (["q_proj"], "no such linear layer"),
                                          ("(query", "not a valid regular expression"),
                                          (".*q_proj", "matches no linear layer")])
def test_target_modules_the_model_lacks(tmp_path, capsys, targets, word):
    peft_to_ms_refuses(capsys, tmp_path, make_adapter(tmp_path / "a", target_modules=targets), "target_modules",
                       word)


def test_module_the_model_lacks_and_layer_out_of_range(tmp_path, capsys):
    a, b = _pairs()[QKV]
    far = QKV.replace("layers.0.", f"layers.{CFG.num_layers}.")
    peft_to_ms_refuses(capsys, tmp_path, make_adapter(tmp_path / "far", {far: (a, b)}), far, "out of range")
    odd = "transformer.encoder.layers.0.self_attention.q_proj"
    peft_to_ms_refuses(capsys, tmp_path, make_adapter(tmp_path / "odd", {odd: (a, b)}), odd, "not a linear layer")


def test_b_of_the_wrong_shape(tmp_path, capsys):
    a, b = _pairs()[QKV]
    peft_to_ms_refuses(capsys, tmp_path, make_adapter(tmp_path / "b", {QKV: (a, b[:-1])}), QKV, "do not fit")
    # without the base config: still refused when layers of one kind disagree
    two = _pairs((QKV, QKV.replace("layers.0.", "layers.1.")))
    k1 = QKV.replace("layers.0.", "layers.1.")
    two[k1] = (two[k1][0][:, :-1], two[k1][1])
    peft_to_ms_refuses(capsys, tmp_path, make_adapter(tmp_path / "c", two, base="nowhere"), k1, "differ")


def test_nan_values(tmp_path, capsys):
    a, b = _pairs()[QKV]
    b = b.copy()
    b[0, 0] = np.nan
    adapter = make_adapter(tmp_path / "n", {QKV: (a, b)})
    peft_to_ms_refuses(capsys, tmp_path, adapter, "adapter_model.safetensors", "lora_B", "1 NaN/Inf")
    assert adapters.main(["peft-to-ms", "--adapter", adapter, "--output", str(tmp_path / "x.ckpt"),
                          "--allow-nonfinite"]) == 0


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_hf_dir(str(tmp_path_factory.mktemp("base") / "tiny"))


def _ms_lora(tmp_path, alpha, pairs=None):
    pairs = _pairs() if pairs is None else pairs
    ckpt = str(tmp_path / "lora.ckpt")
    items = []
    for m, (a, b) in pairs.items():
        items += [(N.peft_to_mindpet(f"{m}.lora_A.weight"), a), (N.peft_to_mindpet(f"{m}.lora_B.weight"), b)]
    save_ms_checkpoint(items, ckpt)
    pet = str(tmp_path / "pet.yaml")
    yaml.safe_dump({"pet_config": {"pet_type": "lora", "lora_rank": R, "lora_alpha": alpha,
                                   "target_modules": ".*query_key_value*"}}, open(pet, "w"))
    return ckpt, pet


@pytest.mark.parametrize("case", ["negative alpha", "nan", "bad regex"])
def test_merge_refuses(base_dir, tmp_path, capsys, case):
    a, b = _pairs()[QKV]
    if case == "nan":
        a = a.copy()
        a[0, 0] = np.inf
    ckpt, pet = _ms_lora(tmp_path, -8 if case == "negative alpha" else 8, {QKV: (a, b)})
    if case == "bad regex":
        yaml.safe_dump({"pet_config": {"pet_type": "lora", "lora_rank": R, "lora_alpha": 8,
                                       "target_modules": "[query"}}, open(pet, "w"))
    out = tmp_path / "merged"
    before = tree_hash(base_dir, ckpt, pet)
    words = {"negative alpha": ("pet.yaml", "lora_alpha"), "nan": ("lora.ckpt", "lora_A", "1 NaN/Inf"),
             "bad regex": ("pet.yaml", "target_modules", "regular expression")}[case]
    refused(capsys, adapters.main(["merge", "--base", base_dir, "--adapter", ckpt, "--pet-config", pet,
                                   "--output", str(out), "--no-progress"]), *words)
    assert not out.exists() and tree_hash(base_dir, ckpt, pet) == before


def test_torch_loader_validates_the_adapter(tmp_path):
    from glm_common.run_config import RunConfigError
    from torch_glm import ChatGLM2ForConditionalGeneration
    from torch_glm.lora import load_lora
    a, b = _pairs()[QKV]
    a = a.copy()
    a[1, 1] = np.nan
    adapter = make_adapter(tmp_path / "n", {QKV: (a, b)})
    with pytest.raises(RunConfigError, match="lora_A: 1 NaN/Inf"):
        load_lora(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), adapter)
    adapter = make_adapter(tmp_path / "d", use_dora=True)
    with pytest.raises(RunConfigError, match="use_dora"):
        load_lora(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), adapter)


def test_run_yaml_target_modules_must_be_a_valid_regex():
    from glm_common.run_config import RunConfigError, pet_settings
    with pytest.raises(RunConfigError, match=r"run.yaml: model.model_config.pet_config.target_modules: '\(q' is not"):
        pet_settings({"pet_type": "lora", "target_modules": "(q"}, "run.yaml: model.model_config.pet_config")
