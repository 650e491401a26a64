"""Config strictness of the run YAML: unknown keys are errors with the closest known key, mindformers keys
without effect are named in the one warning, a key given twice is an error, numeric values have ranges;
the shipped mindformers YAMLs still load."""
import copy
import glob
import os
import warnings

import pytest

from glm_common.run_config import (RunConfigError, RunConfigWarning, load_run_config, load_yaml,
                                   settings_from_config)
from tests.conftest import ROOT, TINY_MODEL

TINY_LORA = str(ROOT / "configs" / "tiny" / "run_tiny_lora.yaml")


def settings(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunConfigWarning)
        return settings_from_config(cfg, "run.yaml")


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True)))
def test_every_shipped_yaml_loads(path):
    settings(load_run_config(path))


def _set(cfg, path, value):
    node = cfg
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = value


@pytest.mark.parametrize("path,value,message", [
    ("runer_config", {"epochs": 1}, "run.yaml: runer_config: unknown key (did you mean 'runner_config'?)"),
    ("runner_config.epoch", 2, "run.yaml: runner_config.epoch: unknown key (did you mean 'runner_config.epochs'?)"),
    ("lr_schedule.warmup_step", 2, "did you mean 'lr_schedule.warmup_steps'?"),
    ("model.model_config.num_layer", 2, "model.model_config.num_layer: unknown model_config key (did you mean "
                                        "'num_layers'?)"),
    ("model.model_config.pet_config.lora_alfa", 2, "pet_config.lora_alfa: unknown key (did you mean 'lora_alpha'?)"),
    ("callbacks.1.save_checkpoint_step", 2, "callbacks[1].save_checkpoint_step: unknown key (did you mean "
                                            "'callbacks[1].save_checkpoint_steps'?)"),
    ("callbacks.1.type", "CheckpointMonitr", "callbacks[1].type: unknown callback 'CheckpointMonitr' (did you mean "
                                             "'CheckpointMonitor'?)"),
    ("callbacks.1.save_checkpoint_steps", 0, "callbacks[1].save_checkpoint_steps: must be >= 1"),
    ("runner_config.max_steps", -5, "runner_config.max_steps: expected -1 (all steps) or a positive integer"),
    ("runner_config.max_steps", 0, "runner_config.max_steps: expected -1"),
    ("eval_step_interval", 0, "eval_step_interval: expected -1"),
    ("seed", -1, "seed: must be >= 0"),
    ("lr_schedule.learning_rate", -1e-4, "lr_schedule.learning_rate: must be >= 0"),
])
def test_typos_and_out_of_range_values_are_errors(path, value, message):
    cfg = load_run_config(TINY_LORA)
    _set(cfg, path, value)
    with pytest.raises(RunConfigError) as e:
        settings(cfg)
    assert message in str(e.value)


def test_mindformers_keys_without_effect_are_named_once():
    cfg = load_run_config(TINY_LORA)
    cfg["profile"] = True
    cfg["context"]["save_graphs"] = False
    cfg["callbacks"][1]["async_save"] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings_from_config(cfg, "run.yaml")
    ours = [str(w.message) for w in caught if issubclass(w.category, RunConfigWarning)]
    assert len(ours) == 1
    for key in ("profile", "context.save_graphs", "callbacks[1].async_save"):
        assert key in ours[0]


def test_seq_length_beyond_the_model(tmp_path):
    cfg = load_run_config(TINY_LORA)
    cfg["load_checkpoint"] = str(TINY_MODEL)
    cfg["model"]["model_config"]["seq_length"] = 257           # the tiny model's config.json says 256
    with pytest.raises(RunConfigError, match=r"model.model_config.seq_length: 257 is beyond the model's 256"):
        settings(cfg)
    cfg["model"]["model_config"]["seq_length"] = 256
    settings(cfg)


def test_duplicate_yaml_keys_are_errors(tmp_path):
    text = open(TINY_LORA, encoding="utf-8").read()
    assert "\nseed: " in text
    bad = tmp_path / "run.yaml"
    bad.write_text(text.replace("\nseed: ", "\nseed: 7\nseed: ", 1), encoding="utf-8")
    line = text[: text.index("\nseed: ")].count("\n") + 3
    with pytest.raises(RunConfigError, match=rf"run.yaml:{line}: not valid YAML: duplicate key 'seed' \(first on line"):
        load_run_config(str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text("a:\n  b: 1\n  c: 2\n  b: 3\n", encoding="utf-8")
    with pytest.raises(RunConfigError, match=r"nested.yaml:4: not valid YAML: duplicate key 'b'"):
        load_yaml(str(nested))
    merged = tmp_path / "merge.yaml"        # YAML merge keys overriding a key are not duplicates
    merged.write_text("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n", encoding="utf-8")
    assert load_yaml(str(merged))["use"] == {"x": 3, "y": 2}


def test_duplicate_keys_in_a_pet_config_and_a_converter_yaml(tmp_path, capsys):
    from convert import adapters, ms_to_hf
    pet = tmp_path / "pet.yaml"
    pet.write_text("pet_config:\n  pet_type: lora\n  lora_alpha: 8\n  lora_alpha: 16\n", encoding="utf-8")
    with pytest.raises(adapters.ConversionError, match=r"pet.yaml:4: not valid YAML: duplicate key 'lora_alpha'"):
        adapters.read_pet_config(str(pet))
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  model_config:\n    num_layers: 2\n    num_layers: 3\n", encoding="utf-8")
    rc = ms_to_hf.main(["--ckpt", str(tmp_path / "x.ckpt"), "--config", str(run), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "run.yaml:4" in err[0] and "duplicate key 'num_layers'" in err[0]
    assert not os.path.exists(tmp_path / "o")
