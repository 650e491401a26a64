"""Gradient overflow on Ascend saturation mode (marked ``ascend``; skipped without one). From the repository root::

    GLM_TEST_DEVICE=Ascend GLM_ASCEND_DEVICES=0 python -m pytest -m ascend tests/mindspore_glm/test_overflow_ascend.py

In saturation mode (the only mode of the Atlas training series, 910A; on 910B/910_93 with
``MS_ASCEND_CHECK_OVERFLOW_MODE=SATURATION_MODE``, set here) an overflowing float16 op gives the largest
finite value instead of inf, so the gradient norm stays finite: only the NPU float-status register
(``mindspore_glm.train_step.FloatStatus``) tells. The tiny model in float16 with a loss scale of 2^40
must overflow (its scaled logits gradient is far beyond 65504): those updates are skipped and the scale
drops by the YAML's factor until the updates go through, with finite losses and weights.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL, ascend_devices

pytestmark = pytest.mark.ascend

PROBE = """
import mindspore as ms
ms.set_context(device_target="Ascend", device_id={device})
from mindspore_glm.train_step import saturation_mode
print("saturation_mode", saturation_mode())
"""


def test_saturation_mode_overflow_is_caught_by_the_float_status(tmp_path):
    from glm_common.run_config import load_run_config
    device = ascend_devices()[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3", MS_ASCEND_CHECK_OVERFLOW_MODE="SATURATION_MODE")
    probe = subprocess.run([sys.executable, "-c", PROBE.format(device=device)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and "saturation_mode True" in probe.stdout, probe.stderr[-2000:]

    cfg = load_run_config(str(ROOT / "configs" / "tiny" / "run_tiny_finetune.yaml"))
    data = tmp_path / "train.json"
    with open(ADGEN_DIR / "train.json", encoding="utf-8") as f:
        data.write_text("".join(f.readlines()[:24]), encoding="utf-8")
    vocab = str(ROOT / cfg["processor"]["tokenizer"]["vocab_file"])
    cfg["load_checkpoint"] = str(TINY_MODEL)
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["context"] = {"mode": 0, "device_target": "Ascend", "device_id": device}
    cfg["processor"]["tokenizer"]["vocab_file"] = vocab
    td = cfg["train_dataset"]
    td["tokenizer"]["vocab_file"] = vocab
    td["data_loader"]["dataset_dir"] = str(data)
    td["max_source_length"] = td["max_target_length"] = 32
    cfg["model"]["model_config"]["param_init_type"] = cfg["model"]["model_config"]["compute_dtype"] = "float16"
    cfg["runner_config"].update(epochs=1, batch_size=4, sink_mode=False)
    cfg["runner_wrapper"] = {"type": "MFTrainOneStepCell", "use_clip_grad": True, "max_grad_norm": 1.0,
                             "scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 2 ** 40,
                                             "scale_factor": 2 ** 10, "scale_window": 1000}}
    cfg["callbacks"][1].update(save_checkpoint_steps=0)
    cfg["use_parallel"] = False
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "mindspore_glm.run", "--config", str(path), "--run_mode", "finetune",
                        "--device_id", str(device), "--no_progress"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(tmp_path / "out" / "loss_log.jsonl", encoding="utf-8") if '"loss"' in x]
    assert len(rows) == 6
    # 2^40 and 2^30 overflow float16 (saturated, so the norm alone would not say so) and are skipped
    assert rows[0]["overflow"] and rows[1]["overflow"], rows
    assert [r["loss_scale"] for r in rows[:3]] == [2.0 ** 40, 2.0 ** 30, 2.0 ** 20]
    applied = [r for r in rows if not r["overflow"]]
    assert applied and applied[-1]["step"] == 6 and all(np.isfinite(r["grad_norm"]) for r in applied)
    assert all(np.isfinite(r["loss"]) for r in rows)
