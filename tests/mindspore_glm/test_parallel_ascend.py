"""Scale-out on one Ascend 910 node (marked ``ascend``; skipped without one). From the repository root::

    GLM_TEST_DEVICE=Ascend GLM_ASCEND_DEVICES=0,1,2,3 python -m pytest -m ascend tests/mindspore_glm/test_parallel_ascend.py

(``GLM_ASCEND_DEVICES``: the four device ids to use; the first one runs the single-device side.)

* The tiny model trained 20 steps in float32 on one device and as semi-auto dp2 x mp2, and as dp4 with
  the optimizer shard: the losses agree within 1e-4 relative, and the rank shards merged by
  ``convert/merge_shards.py`` with the run's strategy files equal the single-device weights within 1e-5.
  The runs are the runner's (``python -m mindspore_glm.run``), the parallel ones four ranks of a MindSpore
  dynamic cluster (scheduler + workers, each with its own ``--device_id``). Gradient clipping is on, at
  a norm the single-device run exceeds (checked): the parallel runs' global norm is the whole model's
  on every rank (``mindspore_glm.train_step.sum_squares`` with ``sliced``), or their losses would drift.
* Fused attention (``FlashAttentionScore``, Atlas A2 / 910B) against the plain path, float16: both
  compared with the float32 golden logits, the fused error within the fp16 budget of the plain one.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL, ascend_devices

pytestmark = pytest.mark.ascend

STEPS = 20
MAX_GRAD_NORM = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml(tmp_path, name, **parallel):
    """configs/tiny/run_tiny_finetune.yaml in float32 on Ascend, 40 ADGEN rows, global batch 4, no shuffle
    differences between the runs (same seed, same global batches), checkpoints at the end only."""
    import yaml
    from glm_common.run_config import load_run_config
    cfg = load_run_config(str(ROOT / "configs" / "tiny" / "run_tiny_finetune.yaml"))
    data = tmp_path / "train.json"
    if not data.exists():
        with open(ADGEN_DIR / "train.json", encoding="utf-8") as f:
            data.write_text("".join(f.readlines()[:40]), encoding="utf-8")
    vocab = str(ROOT / cfg["processor"]["tokenizer"]["vocab_file"])
    cfg["load_checkpoint"] = str(TINY_MODEL)
    cfg["output_dir"] = str(tmp_path / name)
    cfg["context"] = {"mode": 0, "device_target": "Ascend", "device_id": 0}
    cfg["processor"]["tokenizer"]["vocab_file"] = vocab
    td = cfg["train_dataset"]
    td["tokenizer"]["vocab_file"] = vocab
    td["data_loader"]["dataset_dir"] = str(data)
    td["max_source_length"] = td["max_target_length"] = 32
    cfg["runner_config"].update(epochs=4, batch_size=4, sink_mode=False)
    cfg["runner_wrapper"] = {"type": "MFTrainOneStepCell", "scale_sense": 1.0, "use_clip_grad": True,
                             "max_grad_norm": MAX_GRAD_NORM}
    cfg["lr_schedule"] = {"type": "cosine", "learning_rate": 1e-3, "lr_end": 0.0, "warmup_steps": 2, "total_steps": -1}
    cfg["callbacks"][1].update(save_checkpoint_steps=10**6)   # beyond the run: the final checkpoint only
    cfg["use_parallel"] = bool(parallel)
    if parallel:
        dp = parallel["data_parallel"]
        cfg["runner_config"]["batch_size"] = 4 // dp          # per replica: the same global batch of 4
        cfg["parallel"] = {"parallel_mode": 1, "gradients_mean": False, "full_batch": True,
                           "search_mode": "sharding_propagation", "loss_repeated_mean": True,
                           "enable_parallel_optimizer": parallel.pop("opt_shard", False),
                           "parallel_optimizer_config": {"gradient_accumulation_shard": False,
                                                         "parallel_optimizer_threshold": 0},
                           "strategy_ckpt_config": {"save_file": "./ckpt_strategy.ckpt"}}
        cfg["parallel_config"] = {"pipeline_stage": 1, "micro_batch_num": 1, "vocab_emb_dp": True, **parallel}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path), cfg["output_dir"]


def _run_cmd(config, device_id):
    return [sys.executable, "-m", "mindspore_glm.run", "--config", config, "--run_mode", "finetune",
            "--train_steps", str(STEPS), "--device_id", str(device_id), "--no_progress"]


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3", **extra)


def _single(tmp_path):
    config, out = _yaml(tmp_path, "single")
    res = subprocess.run(_run_cmd(config, ascend_devices()[0]), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _cluster(tmp_path, name, **parallel):
    """Four ranks of a MindSpore dynamic cluster on this node, each on its own device."""
    config, out = _yaml(tmp_path, name, **parallel)
    devices = ascend_devices()[:4]
    assert len(devices) == 4, "GLM_ASCEND_DEVICES: four device ids are needed"
    port = str(_free_port())
    cluster = dict(MS_SCHED_HOST="127.0.0.1", MS_SCHED_PORT=port, MS_WORKER_NUM="4", RANK_SIZE="4")
    sched = subprocess.Popen([sys.executable, "-c", "import mindspore as ms; from mindspore.communication import "
                              "init; ms.set_context(device_target='Ascend'); init()"],
                             cwd=ROOT, env=_env(MS_ROLE="MS_SCHED", **cluster))
    workers = []
    for rank, dev in enumerate(devices):
        log = open(tmp_path / f"{name}_rank_{rank}.log", "w")
        workers.append((subprocess.Popen(_run_cmd(config, dev), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env=_env(MS_ROLE="MS_WORKER", MS_NODE_ID=str(rank), RANK_ID=str(rank),
                                                  DEVICE_ID=str(dev), **cluster)), log))
    try:
        codes = [p.wait(timeout=3600) for p, _ in workers]
    finally:
        for p, log in workers:
            if p.poll() is None:
                p.kill()
            log.close()
        sched.wait(timeout=120) if sched.poll() is None else None
    for rank, code in enumerate(codes):
        assert code == 0, (tmp_path / f"{name}_rank_{rank}.log").read_text()[-3000:]
    return out


def _rows(out):
    rows = [json.loads(r) for r in open(os.path.join(out, "loss_log.jsonl"), encoding="utf-8")]
    return [r for r in rows if "loss" in r]


def _losses(out):
    return np.array([r["loss"] for r in _rows(out)], np.float64)


def _final(out):
    from convert.ms_ckpt import MSCheckpoint
    d = os.path.join(out, "checkpoint", "rank_0")
    (name,) = [f for f in os.listdir(d) if f.endswith(".ckpt")]
    return MSCheckpoint(os.path.join(d, name))


def _compare(tmp_path, single, parallel):
    a, b = _losses(single), _losses(parallel)
    assert len(a) == len(b) == STEPS
    assert np.max(np.abs(a - b) / np.abs(a)) <= 1e-4, (a, b)
    norms = [(r["grad_norm"], q["grad_norm"]) for r, q in zip(_rows(single), _rows(parallel))]
    assert max(n for n, _ in norms) > MAX_GRAD_NORM, norms          # the clip mattered
    assert all(abs(n - m) <= 1e-4 * n for n, m in norms), norms     # and saw the whole model's norm
    merged = str(tmp_path / f"{os.path.basename(parallel)}_merged.ckpt")
    res = subprocess.run([sys.executable, str(ROOT / "convert" / "merge_shards.py"), "--src",
                          os.path.join(parallel, "checkpoint"), "--strategy", os.path.join(parallel, "strategy"),
                          "--output", merged, "--params", "all", "--quiet"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    from convert.ms_ckpt import MSCheckpoint
    ref, got = _final(single), MSCheckpoint(merged)
    weights = [n for n in ref.names if not n.startswith(("adam_", "accu_")) and n not in
               ("epoch_num", "step_num", "global_step", "loss_scale", "loss_scale_good_steps")]
    assert weights and set(weights) <= set(got.names)
    for n in weights:
        x, y = ref.read(n).astype(np.float64), got.read(n).astype(np.float64)
        assert x.shape == y.shape, n
        assert np.max(np.abs(x - y)) <= 1e-5 * max(1.0, np.abs(x).max()), n


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return tmp, _single(tmp)


def test_dp2_mp2_equals_single_device(single_run):
    tmp, single = single_run
    out = _cluster(tmp, "dp2xmp2", data_parallel=2, model_parallel=2)
    assert os.path.isdir(os.path.join(out, "strategy"))
    _compare(tmp, single, out)


def test_dp4_optimizer_shard_equals_single_device(single_run):
    tmp, single = single_run
    out = _cluster(tmp, "dp4_opt_shard", data_parallel=4, model_parallel=1, opt_shard=True)
    _compare(tmp, single, out)


def test_fused_attention_within_fp16_budget_of_plain():
    import mindspore as ms
    try:
        from mindspore._c_expression import MSContext
        soc = MSContext.get_instance().get_ascend_soc_version()
    except Exception:
        soc = ""
    if soc and "910b" not in soc.lower() and "910_93" not in soc.lower():
        pytest.skip(f"FlashAttentionScore needs Atlas A2 (910B); this device is {soc}")
    from glm_common.config import ChatGLM2Config, RunOptions
    from glm_common.run_config import TrainSettings
    from mindspore_glm import ChatGLM2ForConditionalGeneration
    from mindspore_glm.parallel import configure_model
    ms.set_context(mode=ms.GRAPH_MODE, device_target="Ascend", device_id=ascend_devices()[0])
    g = np.load(TINY_MODEL / "golden.npz")
    ids = [ms.Tensor(g[k].astype(np.int32)) for k in ("batch_input_ids", "batch_attention_mask", "batch_position_ids")]
    mask = g["batch_attention_mask"] == 1
    errs = {}
    for fused in (False, True):
        opts = RunOptions(param_init_type="float16", compute_dtype="float16", use_flash_attention=fused)
        model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL, options=opts)
        s = TrainSettings(config=ChatGLM2Config.from_hf(TINY_MODEL), options=opts)
        s.device_target = "Ascend"
        assert configure_model(model, s)["flash_attention"] is fused
        logits = model(*ids).asnumpy().astype(np.float32)
        errs[fused] = np.abs(logits - g["batch_logits"])[mask].max()
    # fp16 budget: the fused kernel may round differently, never by more than the plain path's own error
    # plus a few fp16 ulps of the logits' scale
    scale = np.abs(g["batch_logits"][mask]).max()
    assert errs[True] <= 2 * errs[False] + 4 * 2 ** -10 * scale, errs
