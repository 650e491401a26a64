"""glm_common.run_config: the shipped YAMLs read as they say, bad values stop with the key's path, keys
that mean nothing here are listed once."""
import copy
import warnings

import pytest

from glm_common.run_config import (RunConfigError, RunConfigWarning, load_run_config, pet_settings,
                                   settings_from_config)
from tests.conftest import ROOT

TINY = {name: str(ROOT / "configs" / "tiny" / f"run_tiny_{name}.yaml")
        for name in ("finetune", "lora", "ptuning2", "lora_eval")}


def read(name):
    return load_run_config(TINY[name])


def quiet(cfg, source="run.yaml"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunConfigWarning)
        return settings_from_config(cfg, source)


def test_tiny_configs_read_as_written():
    s = quiet(read("lora"))
    assert s.pet == {"pet_type": "lora", "r": 8, "lora_alpha": 32.0, "lora_dropout": 0.1,
                     "target_modules": ".*query_key_value*"}
    assert (s.batch_size, s.epochs, s.max_source_length, s.max_target_length) == (4, 1, 64, 64)
    assert (s.loss_scale_dynamic, s.loss_scale_value, s.loss_scale_factor, s.loss_scale_window) == (True, 1.0, 2.0, 1000)
    assert (s.schedule, s.learning_rate, s.lr_end, s.warmup_steps, s.total_steps) == ("polynomial", 1e-3, 1e-6, 10, -1)
    assert (s.optimizer_type, s.bias_correction, s.beta2, s.weight_decay) == ("fusedadamweightdecay", False, 0.95, 0.1)
    assert (s.ckpt_prefix, s.save_steps, s.keep_max) == ("tiny-glm2-lora", 50, 2)
    assert s.vocab_file.endswith("tiny_glm2_sp.model") and s.train_file.endswith("train.json")
    p = quiet(read("ptuning2"))
    assert p.pet["pet_type"] == "ptuning2" and p.config.pre_seq_len == 4 and p.pet["dropout_prob"] == 0.0
    f = quiet(read("finetune"))
    assert f.pet == {"pet_type": "full"} and f.context_mode == 0 and f.device_target == "CPU"


def test_unknown_keys_are_warned_once():
    cfg = read("lora")
    cfg["profile"] = True
    cfg["context"]["save_graphs"] = False
    cfg["train_dataset"]["num_parallel_workers"] = 8
    cfg["callbacks"].append({"type": "SummaryMonitor", "summary_dir": "x"})
    cfg["model"]["model_config"]["checkpoint_name_or_path"] = "glm2_6b"
    cfg["parallel"]["enable_alltoall"] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = settings_from_config(cfg, "run.yaml")
    ours = [w for w in caught if issubclass(w.category, RunConfigWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    for key in ("profile", "context.save_graphs", "train_dataset.num_parallel_workers",
                "callbacks[2] (type 'SummaryMonitor')", "model.model_config.checkpoint_name_or_path"):
        assert key in text and key in s.ignored
    # honoured keys are not listed
    for key in ("lr_schedule.warmup_steps", "runner_wrapper.scale_sense", "callbacks[1].prefix", "seed",
                "parallel.full_batch", "parallel.enable_parallel_optimizer"):
        assert key not in text


@pytest.mark.parametrize("path,value,message", [
    ("lr_schedule.type", "warp", "lr_schedule.type: expected one of"),
    ("lr_schedule.learning_rate", "fast", "lr_schedule.learning_rate: expected a number"),
    ("lr_schedule.total_steps", 0, "lr_schedule.total_steps: expected -1"),
    ("optimizer.beta2", 1.5, "optimizer.beta2: must be < 1"),
    ("optimizer.type", "SGD", "optimizer.type: only the AdamWeightDecay family"),
    ("runner_config.batch_size", 0, "runner_config.batch_size: must be >= 1"),
    ("runner_config.epochs", "two", "runner_config.epochs: expected an integer"),
    ("runner_wrapper.use_clip_grad", "maybe", "runner_wrapper.use_clip_grad: expected true or false"),
    ("runner_wrapper.scale_sense.type", "Magic", "runner_wrapper.scale_sense.type: expected one of"),
    ("runner_wrapper.scale_sense.loss_scale_value", 0.5, "runner_wrapper.scale_sense.loss_scale_value: must be >= 1"),
    ("context.mode", 7, "context.mode: expected 0"),
    ("context.device_target", "TPU", "context.device_target: expected one of"),
    ("context.max_device_memory", "lots", "context.max_device_memory: expected a size"),
    ("train_dataset.max_source_length", -3, "train_dataset.max_source_length: must be >= 1"),
    ("train_dataset.data_loader.origin_columns", ["prompt", "response"], "origin_columns: only"),
    ("parallel.parallel_mode", 2, "parallel.parallel_mode: expected 0"),
    ("metric.type", "BLEUMetric", "metric.type: expected one of ADGENMetric, PerplexityMetric"),
    ("model.model_config.pet_config.lora_rank", 0, "pet_config.lora_rank: must be >= 1"),
    ("model.model_config.pet_config.lora_dropout", 1.0, "pet_config.lora_dropout: must be < 1"),
    ("model.model_config.pet_config.pet_type", "adapter", "pet_config.pet_type: expected one of"),
    ("model.model_config.compute_dtype", "float8", "compute_dtype"),
    ("run_mode", "serve", "run_mode: expected one of"),
])
def test_bad_values_stop_with_the_key_path(path, value, message):
    cfg = copy.deepcopy(read("lora"))
    node = cfg
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    with pytest.raises(RunConfigError) as err:
        quiet(cfg, "run.yaml")
    assert str(err.value).startswith("run.yaml") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_callbacks_and_ptuning_errors():
    cfg = read("lora")
    cfg["callbacks"][1]["keep_checkpoint_max"] = 0
    with pytest.raises(RunConfigError, match=r"callbacks\[1\]\.keep_checkpoint_max: must be >= 1"):
        quiet(cfg)
    with pytest.raises(RunConfigError, match="pre_seq_len: missing"):
        pet_settings({"pet_type": "ptuning2"})


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 0\nmodel:\n  model_config: [\n")
    with pytest.raises(RunConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_run_config(str(path))
    with pytest.raises(RunConfigError, match="no such file"):
        load_run_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("value,expected", [(True, ("self_attention", "mlp")), (False, ()), (["mlp", "self_attention"],
                                                                           ("mlp", "self_attention"))])
def test_select_recompute_is_read(value, expected):
    cfg = copy.deepcopy(read("lora"))
    cfg["recompute_config"] = {"recompute": False, "select_recompute": value}
    s = quiet(cfg)
    assert s.scaleout["recompute"]["select_recompute"] == expected
    assert not any("select_recompute" in k for k in s.ignored)


@pytest.mark.parametrize("value", [3, ["mlp", 4], ["mlp("]])
def test_bad_select_recompute_names_the_key(value):
    cfg = copy.deepcopy(read("lora"))
    cfg["recompute_config"] = {"select_recompute": value}
    with pytest.raises(RunConfigError) as err:
        quiet(cfg, "run.yaml")
    assert str(err.value).startswith("run.yaml: recompute_config.select_recompute:") and "\n" not in str(err.value)
