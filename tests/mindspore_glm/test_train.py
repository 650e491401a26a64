"""mindspore_glm.train on the ADGEN sample with the tiny model (GRAPH mode, CPU): LoRA, P-tuning v2 and full
fine-tuning lower the loss; checkpoints are mindformers-shaped and resume to the same trajectory; loss
scaling skips overflowing updates; a NaN loss under a fixed scale stops the run."""
import json
import os
import warnings

import numpy as np
import pytest
import mindspore as ms

from glm_common.run_config import RunConfigWarning, load_run_config, settings_from_config
from mindspore_glm.checkpointing import find_checkpoints
from mindspore_glm.train import TrainingError, build_model, train
from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL

CONFIGS = {"full": "finetune", "lora": "lora", "ptuning2": "ptuning2"}


def run_config(tmp_path, pet="lora", lr=5e-3, rows=16, epochs=8, batch=4, **over):
    """configs/tiny/run_tiny_<pet>.yaml on the first ``rows`` ADGEN rows, short sequences, output in tmp."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.json"
    with open(ADGEN_DIR / "train.json", encoding="utf-8") as f:
        data.write_text("".join(f.readlines()[:rows]), encoding="utf-8")
    cfg = load_run_config(str(ROOT / "configs" / "tiny" / f"run_tiny_{CONFIGS[pet]}.yaml"))
    cfg["load_checkpoint"] = str(TINY_MODEL)
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["processor"]["tokenizer"]["vocab_file"] = str(ROOT / cfg["processor"]["tokenizer"]["vocab_file"])
    td = cfg["train_dataset"]
    td["tokenizer"]["vocab_file"] = cfg["processor"]["tokenizer"]["vocab_file"]
    td["data_loader"]["dataset_dir"] = str(data)
    td["max_source_length"] = td["max_target_length"] = 32
    cfg["runner_config"].update(epochs=epochs, batch_size=batch)
    cfg["lr_schedule"] = {"type": "cosine", "learning_rate": lr, "lr_end": 0.0, "warmup_steps": 2, "total_steps": -1}
    cfg["callbacks"][1].update(save_checkpoint_steps=10**6)   # beyond the run: the final checkpoint only
    cfg.update(over)
    return cfg


def settings(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunConfigWarning)
        s = settings_from_config(cfg, "run.yaml")
    s.progress = False
    return s


def mean(x):
    return sum(x) / len(x)


@pytest.mark.parametrize("pet,lr,drop", [("lora", 5e-3, 0.4), ("ptuning2", 0.3, 0.4), ("full", 1e-3, 1.0)])
def test_fine_tuning_lowers_the_loss(tmp_path, pet, lr, drop):
    out = train(settings(run_config(tmp_path, pet, lr)))
    losses = out["losses"]
    assert out["steps"] == len(losses) == 32 and out["skipped"] == 0  # 16 rows / batch 4 x 8 epochs
    assert mean(losses[-4:]) < mean(losses[:4]) - drop, (mean(losses[:4]), mean(losses[-4:]))
    rows = [json.loads(r) for r in open(out["log"], encoding="utf-8")]
    assert [r["step"] for r in rows] == list(range(1, 33))
    assert rows[-1]["loss"] == pytest.approx(losses[-1], abs=1e-6)
    assert {"lr", "loss_scale", "tokens_per_s", "overflow"} <= set(rows[-1]) and rows[-1]["loss_scale"] == 1.0
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(lr)       # warmup 2 steps
    assert (tmp_path / "out" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final checkpoint: mindformers' place and name, read by MindSpore's own loader
    ckpt = tmp_path / "out" / "checkpoint" / "rank_0" / f"tiny-glm2{'' if pet == 'full' else '-' + pet}-8_4.ckpt"
    assert out["result"] == str(ckpt)
    saved = ms.load_checkpoint(str(ckpt))
    model = out["model"]
    params = {p.name: p for p in model.get_parameters()}
    weights = {n for n in saved if n in params}
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert weights == (set(params) if pet == "full" else trainable)
    assert {"adam_m." + n for n in trainable} <= set(saved) and int(saved["step_num"].asnumpy()[0]) == 32
    for n in list(trainable)[:3]:
        np.testing.assert_array_equal(saved[n].asnumpy(), params[n].asnumpy())


@pytest.mark.parametrize("accum", [1, 2], ids=["plain", "accumulate-2"])
def test_resume_gives_the_same_next_ten_losses(tmp_path, accum):
    """LoRA (dropout 0), 32 rows (64 with gradient accumulation 2), batch 2: 16 updates with checkpoints
    every 3; kill after update 6, resume: the micro-batches already used are skipped."""
    cfg = run_config(tmp_path, "lora", 5e-3, rows=32 * accum, epochs=1, batch=2)
    cfg["runner_config"]["gradient_accumulation_steps"] = accum
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0
    cfg["callbacks"][1].update(save_checkpoint_steps=3, keep_checkpoint_max=10, prefix="tiny")
    whole = train(settings(cfg))["losses"]
    assert len(whole) == 16
    ckdir = tmp_path / "out" / "checkpoint" / "rank_0"
    assert [os.path.basename(p) for _, p in find_checkpoints(str(ckdir), "tiny")] == \
        ["tiny-1_3.ckpt", "tiny-1_6.ckpt", "tiny-1_9.ckpt", "tiny-1_12.ckpt", "tiny-1_15.ckpt", "tiny-1_16.ckpt"]
    for name in ("tiny-1_9.ckpt", "tiny-1_12.ckpt", "tiny-1_15.ckpt", "tiny-1_16.ckpt"):
        os.remove(ckdir / name)   # as if the run had died between steps 6 and 9
    cfg["resume_training"] = True
    resumed = train(settings(cfg))["losses"]
    assert len(resumed) == 10
    assert resumed == whole[6:]
    logged = [json.loads(r)["loss"] for r in open(tmp_path / "out" / "loss_log.jsonl", encoding="utf-8")]
    assert logged == [round(x, 6) for x in whole]


def test_keep_checkpoint_max(tmp_path):
    cfg = run_config(tmp_path, "ptuning2", 0.1, rows=16, epochs=1, batch=4)
    cfg["callbacks"][1].update(save_checkpoint_steps=1, keep_checkpoint_max=2)
    train(settings(cfg))
    assert sorted(os.listdir(tmp_path / "out" / "checkpoint" / "rank_0")) == \
        ["tiny-glm2-ptuning2-1_3.ckpt", "tiny-glm2-ptuning2-1_4.ckpt"]


def _poisoned(cfg):
    """The model of ``cfg`` with one NaN column in the output layer: every loss and gradient is NaN."""
    s = settings(cfg)
    model, params = build_model(s)
    w = model.transformer.output_layer.weight
    bad = w.asnumpy()
    bad[:, 0] = np.nan
    w.set_data(ms.Tensor(bad))
    return s, model, params


def test_dynamic_loss_scale_skips_overflowing_updates(tmp_path, capsys):
    """Non-finite gradients under a dynamic scale: every update is skipped (weights unchanged), the scale
    halves each time, the run goes on and says so."""
    cfg = run_config(tmp_path, "lora", 5e-3, rows=16, epochs=1, batch=4)
    cfg["runner_wrapper"]["scale_sense"] = {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024,
                                            "scale_factor": 2, "scale_window": 1000}
    s, model, params = _poisoned(cfg)
    before = {p.name: p.asnumpy().copy() for p in params}
    out = train(s, model, params)
    rows = [json.loads(r) for r in open(out["log"], encoding="utf-8")]
    assert out["skipped"] == 4 and [r["overflow"] for r in rows] == [True] * 4
    assert [r["loss_scale"] for r in rows] == [1024.0, 512.0, 256.0, 128.0]
    err = capsys.readouterr().err
    assert "step 1: gradient overflow at loss scale 1024, update skipped" in err and "4 skipped (overflow)" in err
    for p in params:
        np.testing.assert_array_equal(p.asnumpy(), before[p.name])


def test_consecutive_overflows_stop_the_run(tmp_path):
    """runner_wrapper.max_consecutive_overflows (default 20) updates overflowing in a row stop the run with
    one line: a stuck loss scale is not trained through."""
    cfg = run_config(tmp_path, "lora", 5e-3, rows=16, epochs=2, batch=4)
    cfg["runner_wrapper"]["scale_sense"] = {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024,
                                            "scale_factor": 2, "scale_window": 1000}
    assert settings(cfg).max_consecutive_overflows == 20
    cfg["runner_wrapper"]["max_consecutive_overflows"] = 3
    s, model, params = _poisoned(cfg)
    with pytest.raises(TrainingError, match=r"^step 3: 3 consecutive updates overflowed \(loss scale 256\); "
                                            r"stopping .*max_consecutive_overflows: 3\)$"):
        train(s, model, params)
    rows = [json.loads(r) for r in open(tmp_path / "out" / "loss_log.jsonl", encoding="utf-8")]
    assert [r["overflow"] for r in rows] == [True] * 3


def test_nan_loss_under_fixed_scale_stops_with_the_step(tmp_path):
    cfg = run_config(tmp_path, "lora", 5e-3, rows=16, epochs=1, batch=4)
    cfg["runner_wrapper"]["scale_sense"] = {"type": "FixedLossScaleUpdateCell", "loss_scale_value": 1}
    s, model, params = _poisoned(cfg)
    with pytest.raises(TrainingError, match=r"^step 1: loss is nan under a fixed loss scale"):
        train(s, model, params)


def test_accumulation_longer_than_an_epoch_is_refused(tmp_path):
    from glm_common.run_config import RunConfigError
    cfg = run_config(tmp_path, "lora", 5e-3, rows=8, epochs=1, batch=4)
    cfg["runner_config"]["gradient_accumulation_steps"] = 3
    with pytest.raises(RunConfigError, match=r"^run.yaml: runner_config.gradient_accumulation_steps: 3 is more "
                                             r"than the 2 batches of an epoch$"):
        train(settings(cfg))
