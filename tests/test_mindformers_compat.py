"""mindformers' own glm2 YAMLs (configs/glm2, v1.0.0 as published) run here after shrinking to the tiny
model and the ADGEN sample by scripts/shrink_config.py, which changes only sizes, paths and the device;
PerplexityMetric, the per-sample generation budget, and the keys that change numbers."""
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import yaml

from glm_common.run_config import RunConfigError, RunConfigWarning, load_run_config, settings_from_config
from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL, TOKENIZER_MODEL

NAMES = ("finetune", "lora", "ptuning2", "lora_eval")
MODES = {"finetune": "finetune", "lora": "finetune", "ptuning2": "finetune", "lora_eval": "eval"}
SIZES = ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
         "multi_query_group_num", "padded_vocab_size")


def _flat(node, prefix=""):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def shrunk(name, tmp, rows=None, **data):
    """configs/glm2/run_glm2_6b_<name>.yaml through scripts/shrink_config.py (absolute paths); ``rows``: a
    dev file of the first rows of the ADGEN sample (a path change)."""
    ddir = ADGEN_DIR
    if rows:
        ddir = tmp / "adgen"
        ddir.mkdir(exist_ok=True)
        for f in ("train.json", "dev.json"):
            lines = open(ADGEN_DIR / f, encoding="utf-8").readlines()
            (ddir / f).write_text("".join(lines[:rows.get(f, len(lines))]), encoding="utf-8")
    out = tmp / f"{name}.yaml"
    r = subprocess.run([sys.executable, "scripts/shrink_config.py", f"configs/glm2/run_glm2_6b_{name}.yaml", str(out),
                        "--data", str(ddir), "--output-dir", str(tmp / "output")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def quiet(cfg, source="run.yaml"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunConfigWarning)
        return settings_from_config(cfg, source)


# ------------------------------------------------------------------------------------------ the YAMLs
@pytest.mark.parametrize("name", NAMES)
def test_shrink_changes_only_sizes_paths_and_device(name, tmp_path):
    src = _flat(yaml.safe_load(open(ROOT / "configs" / "glm2" / f"run_glm2_6b_{name}.yaml", encoding="utf-8")))
    dst = _flat(yaml.safe_load(open(shrunk(name, tmp_path), encoding="utf-8")))
    assert set(src) == set(dst)
    changed = {k for k in src if src[k] != dst[k]}
    allowed = {f"model.model_config.{k}" for k in SIZES} | {"load_checkpoint", "output_dir", "context.device_target"}
    for k in changed - allowed:
        assert k.endswith(("vocab_file", "dataset_dir")), k
    tiny = json.loads((TINY_MODEL / "config.json").read_text())
    assert all(dst[f"model.model_config.{k}"] == tiny[k] for k in SIZES)
    # the shipped tiny twins are what the script writes (paths relative to the repository)
    twin = ROOT / "configs" / "tiny" / "mindformers" / f"run_glm2_6b_{name}.yaml"
    r = subprocess.run([sys.executable, "scripts/shrink_config.py", f"configs/glm2/run_glm2_6b_{name}.yaml",
                        str(tmp_path / "twin.yaml"), "--paths", "relative"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "twin.yaml").read_text() == twin.read_text()


@pytest.mark.parametrize("name", NAMES)
def test_every_key_is_honoured_or_named(name):
    """One warning; what it names are keys without effect here, never ones that change the numbers."""
    cfg = load_run_config(str(ROOT / "configs" / "tiny" / "mindformers" / f"run_glm2_6b_{name}.yaml"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = settings_from_config(cfg, "run.yaml")
    ours = [w for w in caught if issubclass(w.category, RunConfigWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    for key in ("lr_scale", "layer_scale", "micro_batch_interleave_num", "processor.tokenizer", "metric",
                "moe_config", "train_dataset.repeat", "max_decode_length", "rope_ratio"):
        assert key not in text, key
    assert "eval_callbacks[0] (type 'ObsMonitor'" in text
    assert s.metrics == (["PerplexityMetric"] if name in ("finetune", "lora") else ["ADGENMetric"])


@pytest.mark.parametrize("path,value,expected", [
    ("lr_scale", True, None),
    ("layer_scale", True, "layer_scale: True (layer-wise learning-rate decay) is not supported"),
    ("micro_batch_interleave_num", 2, "micro_batch_interleave_num: only 1 is supported"),
    ("processor.tokenizer.eos_token", "</s>", "processor.tokenizer.eos_token: ChatGLM2's special tokens are fixed"),
    ("eval_callbacks", [{"type": "EvalCallBack"}], "eval_callbacks[0]: only ObsMonitor"),
    ("train_dataset.repeat", 2, "train_dataset.repeat: only 1 is supported"),
    ("moe_config.expert_num", 4, "moe_config.expert_num: ChatGLM2 has no experts"),
    ("auto_trans_ckpt", True, "auto_trans_ckpt: True reshards"),
    ("eval_epoch_interval", 1, "eval_epoch_interval: only -1"),
    ("metric.type", "EmF1Metric", "metric.type: expected one of ADGENMetric, PerplexityMetric"),
    ("train_dataset.ignore_pad_token_for_loss", False, "train_dataset.ignore_pad_token_for_loss: only True"),
    ("model.model_config.qkv_concat", False, "model.model_config.qkv_concat: only True is supported"),
    ("model.model_config.mlp_concat", False, "model.model_config.mlp_concat: only True is supported"),
    ("model.model_config.rope_ratio", -1, "model.model_config.rope_ratio: expected a positive number"),
])
def test_keys_that_change_numbers_are_honoured_or_refused(path, value, expected):
    cfg = load_run_config(str(ROOT / "configs" / "tiny" / "mindformers" / "run_glm2_6b_lora.yaml"))
    base = quiet(cfg)
    node = cfg
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    if expected is None:    # lr_scale: lr x devices (data_parallel 8 here) x per-device batch 8 / lr_scale_factor
        assert quiet(cfg).learning_rate == pytest.approx(base.learning_rate * 8 * 8 / 256)
        cfg["use_parallel"] = False
        assert quiet(cfg).learning_rate == pytest.approx(base.learning_rate * 8 / 256)
        return
    with pytest.raises(RunConfigError, match=None) as e:
        quiet(cfg)
    assert expected in str(e.value)


def test_metric_type_list_and_flash_attention_note():
    cfg = load_run_config(str(ROOT / "configs" / "tiny" / "mindformers" / "run_glm2_6b_lora.yaml"))
    cfg["metric"] = [{"type": "ADGENMetric"}, {"type": "PerplexityMetric"}]
    cfg["model"]["model_config"]["use_flash_attention"] = True
    s = quiet(cfg)
    assert s.metrics == ["ADGENMetric", "PerplexityMetric"]
    assert any(k.startswith("model.model_config.use_flash_attention (") and "no effect on CPU" in k
               for k in s.ignored)
    assert "model.model_config.use_past (generation always uses the KV cache: the same tokens)" in s.ignored
    cfg["model"]["model_config"]["use_past"] = True
    assert not any("use_past" in k for k in quiet(cfg).ignored)
    cfg["metric"] = {"type": ["PerplexityMetric"]}
    assert quiet(cfg).metrics == ["PerplexityMetric"]


# ------------------------------------------------------------------------------------------ metrics
def test_perplexity_metric_is_exp_of_the_mean_token_loss_of_torch_logits(tmp_path):
    """MindSpore's PerplexityMetric (eval of the shrunk finetune YAML, float32) against exp(mean token
    loss) from torch_glm's logits and torch's cross entropy, batch by batch as mindformers averages."""
    import torch
    from glm_common.data import build_train_features, load_samples
    from glm_common.tokenizer import ChatGLM2Tokenizer
    from mindspore_glm.train import build_model, eval_perplexity, set_context
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    cfg = load_run_config(str(shrunk("finetune", tmp_path, rows={"dev.json": 12})))
    mc = cfg["model"]["model_config"]
    mc["param_init_type"] = mc["compute_dtype"] = "float32"     # compared with float32 torch
    cfg["context"]["mode"] = 1
    s = quiet(cfg)
    assert s.metrics == ["PerplexityMetric"] and s.eval_batch_size == 8
    tok = ChatGLM2Tokenizer(str(TOKENIZER_MODEL))
    samples = load_samples(s.eval_file)
    set_context(s)
    model, _ = build_model(s)
    model.set_train(False)
    got = eval_perplexity(model, s, tok, samples)
    # independent: torch logits, torch cross entropy, per batch of 8 (12 rows: batches of 8 and 4)
    feats = build_train_features(samples, tok, max_source_length=s.eval_max_source_length,
                                 max_target_length=s.eval_max_target_length)
    ref = ChatGLM2ForConditionalGeneration.from_pretrained(str(TINY_MODEL)).eval()
    losses = []
    with torch.no_grad():
        for lo in range(0, len(samples), 8):
            ids = torch.from_numpy(feats["input_ids"][lo:lo + 8])
            labels = torch.from_numpy(feats["labels"][lo:lo + 8])
            logits = ref(input_ids=ids).logits.double()
            losses.append(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100).item())
    assert len(losses) == 2
    assert got["loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert got["PPL"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-4)
    # the numpy metric on the torch logits gives the same
    from glm_common.metrics import PerplexityMetric
    m = PerplexityMetric()
    with torch.no_grad():
        for lo in range(0, len(samples), 8):
            m.update(ref(input_ids=torch.from_numpy(feats["input_ids"][lo:lo + 8])).logits.numpy(),
                     feats["labels"][lo:lo + 8])
    assert m.eval()["PPL"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-6)


def test_generation_budget_per_sample():
    from glm_common.generation import budget_groups, plan_generation
    plan = plan_generation([30, 70, 256, 300], seq_length=256, max_decode_length=256, max_new_tokens=256)
    assert plan.lengths.tolist() == [30, 70, 255, 255] and plan.new_tokens.tolist() == [226, 186, 1, 1]
    assert plan.truncated == [2, 3] and "2 of 4 eval prompts" in plan.message()
    groups = budget_groups(plan.lengths, plan.new_tokens, 256)
    for rows, new in groups:
        assert max(plan.lengths[rows]) + new <= 256
    assert sorted(i for rows, _ in groups for i in rows) == [0, 1, 2, 3]
    fits = plan_generation([30, 70], seq_length=512, max_decode_length=256, max_new_tokens=256)
    assert fits.new_tokens.tolist() == [226, 186] and len(budget_groups(fits.lengths, fits.new_tokens, 512)) == 1


# ------------------------------------------------------------------------------------------ runs
def _run(args, cwd, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
    return subprocess.run([sys.executable, "-m", "mindspore_glm.run", *args, "--no_progress"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["finetune", "lora", "ptuning2"])
def test_shrunk_yaml_finetunes_on_cpu(name, tmp_path):
    """The published YAML's finetune on one CPU device (use_parallel False, as run_mindformer.py's flag):
    loss log and a checkpoint named as mindformers names it (prefix, epoch_step); then the YAML's metric."""
    cfg = shrunk(name, tmp_path, rows={"train.json": 16, "dev.json": 8})
    r = _run(["--config", str(cfg), "--run_mode", "finetune", "--use_parallel", "False", "--train_steps", "2"],
             tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("keys that mean nothing here, ignored:") == 1
    prefix = yaml.safe_load(open(cfg))["callbacks"][1]["prefix"]
    ckpts = sorted(os.listdir(tmp_path / "output" / "checkpoint" / "rank_0"))
    assert ckpts and all(c.startswith(prefix) and c.endswith(".ckpt") for c in ckpts), ckpts
    rows = [json.loads(x) for x in open(tmp_path / "output" / "loss_log.jsonl")]
    assert [x["step"] for x in rows] == [1, 2]
    # float16 weights with the YAML's loss scale 65536, float32 moments and masters: no update overflows
    assert all(not x["overflow"] and np.isfinite(x["loss"]) for x in rows), rows
    if name == "finetune":     # metric.type: PerplexityMetric, the YAML's eval (of its load_checkpoint)
        r = _run(["--config", str(cfg), "--run_mode", "eval", "--use_parallel", "False"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        line = next(x for x in r.stdout.splitlines() if x.startswith("PerplexityMetric = "))
        res = json.load(open(tmp_path / "output" / "eval_results.json"))
        assert line == f"PerplexityMetric = {{'PerplexityMetric': {{'loss': {res['loss']!r}, 'PPL': {res['PPL']!r}}}}}"
        assert res["PPL"] == pytest.approx(math.exp(res["loss"]))


#: what float16 weights and compute may move a logged loss away from the float32 run's, over 20 steps of
#: the shrunk YAMLs (measured: at most 1.0e-3 in MindSpore, 1.1e-3 in torch_glm, both on the finetune YAML)
FP16_LOSS_BUDGET = 5e-3
STEPS = 20


def _train_shipped(backend, name, dtype, tmp):
    """``STEPS`` updates of the shrunk shipped YAML ``name`` (``dtype``: "float16" as shipped, or float32
    weights and compute) in ``backend``; returns (logged rows, the loss of 8 fixed training rows before
    and after, the saved weights)."""
    from glm_common.data import load_samples
    from glm_common.tokenizer import ChatGLM2Tokenizer
    cfg = load_run_config(str(shrunk(name, tmp)))
    mc = cfg["model"]["model_config"]
    assert mc["param_init_type"] == mc["compute_dtype"] == "float16"       # as shipped
    if dtype == "float32":
        mc["param_init_type"] = mc["compute_dtype"] = "float32"
    cfg["use_parallel"] = False
    cfg["output_dir"] = str(tmp / f"{backend}-{dtype}")
    s = quiet(cfg)
    s.progress, s.max_steps, s.do_eval = False, STEPS, False
    # the fixed rows' loss at the training lengths (eval_loss reads the eval lengths)
    s.eval_max_source_length, s.eval_max_target_length = s.max_source_length, s.max_target_length
    tok = ChatGLM2Tokenizer(str(TOKENIZER_MODEL))
    fixed = load_samples(s.train_file)[:8]
    if backend == "ms":
        from convert.ms_ckpt import MSCheckpoint
        from mindspore_glm.evaluate import eval_loss
        from mindspore_glm.train import build_model, set_context, train
        set_context(s)
        model, params = build_model(s)
        model.set_train(False)
        before = eval_loss(model, s, tok, fixed)
        out = train(s, model, params)
        model.set_train(False)
        after = eval_loss(model, s, tok, fixed)
        ck = MSCheckpoint(out["result"])
        weights = {n: ck.read(n) for n in ck.names if not n.startswith(("adam_", "master_weights."))}
        assert all(ck.read(n).dtype == np.float32 for n in ck.names if n.startswith(("adam_", "master_weights.")))
    else:
        import torch
        from torch_glm.evaluate import eval_loss
        from torch_glm.train import build_model, train
        model, params = build_model(s, "cpu")
        assert next(p for p in model.parameters() if p.requires_grad).dtype == getattr(torch, dtype)
        model.eval()
        before = eval_loss(model, s, tok, fixed)
        out = train(s, model, params, device="cpu")
        model.eval()
        after = eval_loss(model, s, tok, fixed)
        weights = {n: p.detach().float().numpy() for n, p in model.named_parameters() if p.requires_grad}
    rows = [json.loads(x) for x in open(out["log"]) if "loss" in json.loads(x)]
    return rows, before, after, weights


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ms", "pt"])
@pytest.mark.parametrize("name", NAMES)
def test_shipped_yaml_trains_in_float16_as_in_float32(name, backend, tmp_path):
    """Each shipped YAML, shrunk, float16 weights and compute as published, 20 updates on CPU: no update
    overflows (the loss scale 65536 needs no warm-up with float32 moments and master weights), every
    logged loss is finite, the loss of 8 fixed training rows falls, the trained weights are finite, and
    the logged losses are the float32 run's within FP16_LOSS_BUDGET."""
    rows, before, after, weights = _train_shipped(backend, name, "float16", tmp_path)
    ref_rows, ref_before, ref_after, _ = _train_shipped(backend, name, "float32", tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert not any(r["overflow"] for r in rows), [r["step"] for r in rows if r["overflow"]]
    losses = np.array([r["loss"] for r in rows], dtype=float)
    assert np.isfinite(losses).all(), losses
    assert after < before and ref_after < ref_before, (before, after, ref_before, ref_after)
    assert all(np.isfinite(w).all() for w in weights.values())
    ref = np.array([r["loss"] for r in ref_rows], dtype=float)
    assert np.abs(losses - ref).max() <= FP16_LOSS_BUDGET, np.abs(losses - ref).max()


@pytest.mark.slow
def test_lora_eval_generates_for_every_sample_as_with_room(tmp_path):
    """run_glm2_6b_lora_eval.yaml (seq_length 256, eval max_source_length 256) evaluates every sample, with
    each sample's budget from its own prompt, and gives the numbers of the same eval with seq_length 512;
    a LoRA pet_config over a checkpoint without LoRA weights is refused."""
    from convert.ms_ckpt import MSCheckpoint  # noqa: F401  (the converter writes the base checkpoint)
    cfg = yaml.safe_load(open(shrunk("lora_eval", tmp_path, rows={"dev.json": 3})))
    base = tmp_path / "base.ckpt"
    r = subprocess.run([sys.executable, "convert/hf_to_ms.py", "--hf-dir", str(TINY_MODEL), "--output", str(base)],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    cfg["load_checkpoint"] = str(base)
    # refused: the pet_config names LoRA, the checkpoint holds none
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    r = _run(["--config", str(path), "--run_mode", "eval", "--use_parallel", "False"], tmp_path)
    assert r.returncode == 2 and "pet_type lora needs its LoRA (lora_a/lora_b) weights, but" in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) and "Traceback" not in r.stderr
    # the base model's eval (no pet_config) at seq_length 256 and 512
    cfg["model"]["model_config"].pop("pet_config")
    results = {}
    for seq in (256, 512):
        cfg["model"]["model_config"]["seq_length"] = seq
        cfg["output_dir"] = str(tmp_path / f"out{seq}")
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        r = _run(["--config", str(path), "--run_mode", "eval", "--use_parallel", "False"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        preds = [json.loads(x) for x in open(tmp_path / f"out{seq}" / "eval_predictions.jsonl", encoding="utf-8")]
        assert len(preds) == 3 and all(p["prediction"] for p in preds)
        results[seq] = (json.load(open(tmp_path / f"out{seq}" / "eval_results.json")), preds)
    assert results[256] == results[512]


# ------------------------------------------------------------------------------------------ P-tuning v2
def _ptuning_config(tmp_path, dropout_prob):
    from tests.conftest import TINY_PTUNING_MODEL
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.json"
    data.write_text("".join(open(ADGEN_DIR / "train.json", encoding="utf-8").readlines()[:40]), encoding="utf-8")
    mc = json.loads((TINY_PTUNING_MODEL / "config.json").read_text())
    for k in ("architectures", "model_type", "torch_dtype", "tie_word_embeddings", "use_cache"):
        mc.pop(k, None)
    mc.update(type="ChatGLM2Config", compute_dtype="float32", param_init_type="float32",
              pet_config={"pet_type": "ptuning2", "pre_seq_len": mc["pre_seq_len"], "prefix_projection": False,
                          "dropout_prob": dropout_prob})
    return {
        "seed": 3, "output_dir": str(tmp_path / "out"), "load_checkpoint": str(TINY_PTUNING_MODEL),
        "runner_config": {"epochs": 2, "batch_size": 4},
        "runner_wrapper": {"type": "MFTrainOneStepCell", "use_clip_grad": True, "max_grad_norm": 1.0,
                           "scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024,
                                           "scale_factor": 2, "scale_window": 1000}},
        "train_dataset": {"data_loader": {"type": "ADGenDataLoader", "dataset_dir": str(data), "shuffle": True},
                          "tokenizer": {"vocab_file": str(TOKENIZER_MODEL)},
                          "max_source_length": 32, "max_target_length": 32},
        "optimizer": {"type": "FusedAdamWeightDecay", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0},
        "lr_schedule": {"type": "linear", "learning_rate": 5e-3, "warmup_steps": 0, "total_steps": -1},
        "model": {"model_config": mc},
    }


@pytest.mark.slow
def test_twenty_ptuning2_steps_match_and_dropout_prob_counts(tmp_path):
    """P-tuning v2 (run_glm2_6b_ptuning2.yaml's recipe: linear lr, no weight decay, dropout_prob 0.0):
    MindSpore and torch_glm give the same 20 float32 losses within 1e-4 relative; torch_glm honours
    dropout_prob (0.1 gives other losses than 0.0; ChatGLM2's code fixes 0.1)."""
    from mindspore_glm import train as ms_train
    from torch_glm import train as pt_train
    losses = {}
    for backend, p in (("ms", 0.0), ("pt", 0.0), ("pt-drop", 0.1)):
        s = quiet(_ptuning_config(tmp_path / backend, p))
        s.progress, s.output_dir = False, str(tmp_path / backend / "out")
        assert s.pet["dropout_prob"] == p
        if backend == "ms":
            model, params = ms_train.build_model(s)
            assert len(params) == 1 and params[0].name.startswith("prefix_encoder.")
            losses[backend] = np.array(ms_train.train(s, model, params)["losses"])
        else:
            model, params = pt_train.build_model(s, "cpu")
            drop = [m.p for m in model.modules() if isinstance(m, __import__("torch").nn.Dropout)]
            assert p in drop
            losses[backend] = np.array(pt_train.train(s, model, params, device="cpu")["losses"])
    a, b = losses["ms"], losses["pt"]
    assert len(a) == len(b) == 20
    rel = np.abs(a - b) / np.abs(b)
    assert rel.max() < 1e-4, rel.max()
    assert a[-3:].mean() < a[:3].mean() - 0.05      # it trained
    assert np.abs(losses["pt-drop"] - b).max() > 1e-3


def test_dropouts_change_the_training_numbers_in_both_backends():
    """hidden_dropout / attention_dropout of model_config act in training (and only there) in both models."""
    import mindspore as ms
    import torch
    from mindspore import Tensor
    from glm_common.config import ChatGLM2Config
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration as MSModel
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    g = np.load(TINY_MODEL / "golden.npz")
    ids, labels = g["batch_input_ids"][:1], g["batch_labels"][:1]
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    base = ChatGLM2Config.from_hf(TINY_MODEL)
    for key in ("hidden_dropout", "attention_dropout"):
        cfg = base.replace(**{key: 0.3})
        m = MSModel.from_pretrained(str(TINY_MODEL), config=cfg)
        m.set_train(False)
        off = float(m(Tensor(ids.astype(np.int32)), None, None, Tensor(labels.astype(np.int32)))[0].asnumpy())
        m.set_train(True)
        on = float(m(Tensor(ids.astype(np.int32)), None, None, Tensor(labels.astype(np.int32)))[0].asnumpy())
        ref = MSModel.from_pretrained(str(TINY_MODEL), config=base)
        ref.set_train(False)
        plain = float(ref(Tensor(ids.astype(np.int32)), None, None, Tensor(labels.astype(np.int32)))[0].asnumpy())
        assert off == pytest.approx(plain, rel=1e-6) and abs(on - off) > 1e-4, (key, on, off)
        t = PTModel.from_pretrained(str(TINY_MODEL), config=cfg)
        with torch.no_grad():
            t.eval()
            off_t = t(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss.item()
            t.train()
            on_t = t(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss.item()
        assert off_t == pytest.approx(plain, rel=1e-4) and abs(on_t - off_t) > 1e-4, (key, on_t, off_t)


@pytest.mark.slow
def test_ptuning2_eval_loss_over_lengths_beyond_seq_length(tmp_path):
    """The shipped P-tuning v2 YAML evaluates at 128 + 128 tokens but its model holds seq_length 193: the
    teacher-forced eval loss (``do_eval``, PerplexityMetric) is taken over the first 193 tokens (MindSpore
    failed in its embedding Gather before), the same number in torch_glm given the same prefix weights."""
    import torch
    from glm_common.data import load_samples
    from glm_common.names import HF_TO_MS_PREFIX
    from glm_common.tokenizer import ChatGLM2Tokenizer
    from glm_common.training import eval_loss_features
    from mindspore_glm.evaluate import eval_loss as ms_eval_loss
    from mindspore_glm.train import build_model as ms_build, set_context
    from torch_glm.evaluate import eval_loss as pt_eval_loss
    from torch_glm.train import build_model as pt_build
    cfg = load_run_config(str(shrunk("ptuning2", tmp_path)))
    mc = cfg["model"]["model_config"]
    mc["param_init_type"] = mc["compute_dtype"] = "float32"
    cfg["use_parallel"] = False
    s = quiet(cfg)
    assert s.eval_max_source_length + s.eval_max_target_length + 1 > s.config.seq_length == 193
    tok = ChatGLM2Tokenizer(str(TOKENIZER_MODEL))
    samples = load_samples(s.eval_file)[:8]
    feats = eval_loss_features(s, tok, samples)
    assert feats["input_ids"].shape == feats["labels"].shape == (8, 193)
    assert (feats["labels"] != -100).any()
    set_context(s)
    ms_model, _ = ms_build(s)
    ms_model.set_train(False)
    got = ms_eval_loss(ms_model, s, tok, samples)
    pt_model, _ = pt_build(s, "cpu")
    ms_params = {p.name: p.asnumpy() for p in ms_model.get_parameters()}
    copied = 0
    with torch.no_grad():
        for name, p in pt_model.named_parameters():
            for hf, ms_name in HF_TO_MS_PREFIX.items():
                if name.endswith(hf.split("transformer.", 1)[1]) and ms_name in ms_params:
                    p.copy_(torch.from_numpy(ms_params[ms_name]))
                    copied += 1
    assert copied >= 1
    pt_model.eval()
    want = pt_eval_loss(pt_model, s, tok, samples)
    assert np.isfinite(got) and got == pytest.approx(want, abs=1e-4)
