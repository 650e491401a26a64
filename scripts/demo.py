"""The main job on the built-in tiny model and the ADGEN sample, step by step (``make demo``).

Each step prints one line: what it did and where its output is. A failing step stops the demo with
the step's name and a non-zero exit. Output goes to ``output/demo/`` (override with --out).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GLOG_v", "3")

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
ADGEN = os.path.join(FIXTURES, "data", "adgen")
PY = sys.executable

STEPS = []


def step(name):
    def register(fn):
        STEPS.append((name, fn))
        return fn
    return register


@step("write tiny HF checkpoint")
def write_checkpoint(ctx):
    from convert.hf_layout import HFCheckpoint, write_tiny_hf_dir
    out = os.path.join(ctx["out"], "tiny_glm2_hf")
    write_tiny_hf_dir(out, layout="sharded-bin")
    ckpt = HFCheckpoint(out)
    ctx["hf_dir"] = out
    return f"{len(ckpt.names)} tensors in {len(ckpt.shards)} .bin shards + index, tokenizer -> {out}"


@step("tokenize the ADGEN sample")
def tokenize(ctx):
    from glm_common.data import build_train_features, load_samples
    from glm_common.tokenizer import ChatGLM2Tokenizer
    tok = ChatGLM2Tokenizer.from_pretrained(ctx["hf_dir"])
    samples = load_samples(os.path.join(ADGEN, "train.json"))
    feats = build_train_features(samples, tok, mode="official", max_source_length=64, max_target_length=64)
    n, length = feats["input_ids"].shape
    cut = int((feats["lengths"] >= length).sum())
    return f"{n} rows -> input_ids/labels [{n}, {length}] (official ChatGLM2 preprocessing), {cut} rows hit the length cap"


@step("convert HF -> MindSpore")
def convert(ctx):
    ms_dir = os.path.join(ctx["out"], "tiny_glm2_ms")
    ckpt = os.path.join(ms_dir, "tiny_glm2.ckpt")
    run([PY, "convert/hf_to_ms.py", "--hf-dir", ctx["hf_dir"], "--output", ckpt, "--no-progress"], ctx)
    shutil.copyfile(os.path.join(ctx["hf_dir"], "config.json"), os.path.join(ms_dir, "config.json"))
    ctx["ms_ckpt"] = ckpt
    return f"streamed to {ckpt} ({os.path.getsize(ckpt)} bytes, mindformers names)"


@step("rank table for 2 devices")
def rank_table(ctx):
    out = os.path.join(ctx["out"], "hccl")
    os.makedirs(out)
    conf = os.path.join(out, "hccn.conf")
    with open(conf, "w") as f:   # what /etc/hccn.conf holds on an Ascend server (addresses are only text here)
        f.write("address_0=192.98.92.100\nnetmask_0=255.255.255.0\naddress_1=192.98.93.100\nnetmask_1=255.255.255.0\n")
    run([PY, "hccl/hccl_tools.py", "--device_num", "[0,2)", "--hccn_conf", conf, "--server_ip", "127.0.0.1",
         "--output", out], ctx)
    table = [os.path.join(out, f) for f in os.listdir(out) if f.startswith("hccl_")][0]
    run([PY, "hccl/validate.py", table, "--device-range", "[0,2)", "-q"], ctx)
    ctx["rank_table"] = table
    return f"{table} (validated)"


@step("shrink the shipped mindformers YAMLs (scripts/shrink_config.py)")
def shrink_yamls(ctx):
    import yaml
    ctx["run_dir"] = os.path.join(ctx["out"], "run")
    made = []
    for name, key, extra in (("run_glm2_6b_lora.yaml", "run_config", ["--output-dir", ctx["run_dir"]]),
                             ("run_glm2_6b_lora_eval.yaml", "eval_config",
                              ["--output-dir", os.path.join(ctx["out"], "eval")])):
        out = os.path.join(ctx["out"], name.replace("6b", "tiny"))
        run([PY, "scripts/shrink_config.py", os.path.join("configs", "glm2", name), out, "--model", ctx["hf_dir"],
             "--checkpoint", ctx["ms_ckpt"], "--vocab", os.path.join(ctx["hf_dir"], "tokenizer.model"), *extra], ctx)
        ctx[key] = out
        made.append(out)
    with open(ctx["run_config"], encoding="utf-8") as f:
        mc = yaml.safe_load(f)["model"]["model_config"]
    return (f"configs/glm2/run_glm2_6b_lora{{,_eval}}.yaml as mindformers ships them (param_init_type "
            f"{mc['param_init_type']}, compute_dtype {mc['compute_dtype']}, seq_length {mc['seq_length']}), "
            f"tiny sizes and paths -> {', '.join(made)}")


@step("LoRA fine-tune on 2 CPU ranks (run_distribute.sh)")
def finetune(ctx):
    import json
    run(["bash", "scripts/run_distribute.sh", "--output", os.path.join(ctx["out"], "launch"), ctx["rank_table"],
         ctx["run_config"], "[0,2)", "finetune", "--", "--no_progress",
         *(["--train_steps", str(ctx["steps"])] if ctx["steps"] else [])], ctx)
    log = os.path.join(ctx["run_dir"], "loss_log.jsonl")
    rows = [json.loads(line) for line in open(log, encoding="utf-8")]
    k = max(1, min(10, len(rows) // 2))
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (rows[:k], rows[-k:]))
    skipped = sum(1 for r in rows if r.get("overflow"))
    ctx["loss_log"] = log
    import yaml
    with open(ctx["run_config"], encoding="utf-8") as f:
        rc = yaml.safe_load(f)["runner_config"]
    return (f"{len(rows)} steps ({rc['epochs']} epoch(s) at batch {rc['batch_size']} per rank, as the YAML says) in "
            f"float16 (float32 Adam moments and master weights), {skipped} overflow skips, "
            f"loss {first:.3f} -> {last:.3f} (mean of the first and last {k} steps; the 6B recipe's learning rate "
            f"5e-5 moves a tiny model slowly); checkpoints in {ctx['run_dir']}/checkpoint")


@step("merge the rank checkpoints (merge_shards.py)")
def merge(ctx):
    out = os.path.join(ctx["out"], "tiny_glm2_lora.ckpt")
    run([PY, "convert/merge_shards.py", "--src", os.path.join(ctx["run_dir"], "checkpoint"), "--output", out,
         "--params", "lora", "--quiet"], ctx)
    from convert.ms_ckpt import MSCheckpoint
    ctx["lora_ckpt"] = out
    return f"2 data-parallel replicas checked bit for bit -> {out} ({len(MSCheckpoint(out).names)} LoRA tensors)"


@step("eval on ADGEN dev (rouge / bleu)")
def evaluate(ctx):
    import json

    import yaml
    with open(ctx["eval_config"], encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    dev = os.path.join(ctx["out"], "dev_head.json")      # the first rows of the dev file, to keep the demo short
    with open(os.path.join(ADGEN, "dev.json"), encoding="utf-8") as f, open(dev, "w", encoding="utf-8") as g:
        g.writelines(f.readlines()[:ctx["eval_samples"]])
    run([PY, "-m", "mindspore_glm.run", "--config", ctx["eval_config"], "--run_mode", "eval", "--load_checkpoint",
         ctx["lora_ckpt"], "--eval_dataset_dir", dev, "--no_progress"], ctx)
    res = json.load(open(os.path.join(cfg["output_dir"], "eval_results.json")))
    return ("rouge-1 {rouge-1:.2f} / rouge-2 {rouge-2:.2f} / rouge-l {rouge-l:.2f} / bleu-4 {bleu-4:.2f} "
            "over {num_samples} dev rows (tiny model: the numbers show the pipeline, not quality)").format(**res)


@step("predict")
def predict(ctx):
    import json
    prompts = ["类型#裤*版型#宽松*风格#性感", "类型#上衣*材质#牛仔布*颜色#白色"]
    out = os.path.join(ctx["out"], "predict")
    run([PY, "-m", "mindspore_glm.run", "--config", ctx["eval_config"], "--run_mode", "predict",
         "--load_checkpoint", ctx["lora_ckpt"], "--output_dir", out, "--predict_data", *prompts], ctx)
    rows = [json.loads(line) for line in open(os.path.join(out, "predict_results.jsonl"), encoding="utf-8")]
    return (f"{len(rows)} responses -> {out}/predict_results.jsonl; first: {rows[0]['query']!r} -> "
            f"{rows[0]['response'][:40]!r}")


@step("parity report torch vs MindSpore (scripts/parity.py)")
def parity(ctx):
    import json
    report = os.path.join(ctx["out"], "parity.json")
    run([PY, "scripts/parity.py", "--hf-dir", ctx["hf_dir"], "--generate", "8", "--report", report,
         "--no-progress"], ctx)
    m = json.load(open(report))["metrics"]
    return (f"max |logit diff| {m['max_abs_diff']:.2e}, top-1 agreement {m['top1_agreement']:.0%}, greedy "
            f"agreement {m['greedy_agreement']:.0%} over {m['greedy_steps']} steps -> {report}")


@step("export: merged HF model + peft adapter")
def export(ctx):
    merged_ckpt = os.path.join(ctx["out"], "tiny_glm2_merged.ckpt")
    hf_out = os.path.join(ctx["out"], "tiny_glm2_lora_merged_hf")
    peft_out = os.path.join(ctx["out"], "peft_adapter")
    run([PY, "convert/adapters.py", "merge", "--base", ctx["ms_ckpt"], "--adapter", ctx["lora_ckpt"],
         "--pet-config", ctx["run_config"], "--output", merged_ckpt, "--no-progress"], ctx)
    run([PY, "convert/ms_to_hf.py", "--ckpt", merged_ckpt, "--config", ctx["hf_dir"], "--output", hf_out,
         "--tokenizer", os.path.join(ctx["hf_dir"], "tokenizer.model"), "--no-progress"], ctx)
    run([PY, "convert/adapters.py", "ms-to-peft", "--ckpt", ctx["lora_ckpt"], "--pet-config", ctx["run_config"],
         "--output", peft_out], ctx)
    return f"HF directory {hf_out}; peft adapter {peft_out} (adapter_config.json + adapter_model.safetensors)"


@step("loss curve")
def loss_curve(ctx):
    png = os.path.join(ctx["run_dir"], "loss_curve.png")
    dst = os.path.join(ctx["out"], "loss_curve.png")
    if not os.path.isfile(png):
        from glm_common.train_log import plot_losses
        plot_losses(ctx["loss_log"], png)
    shutil.copyfile(png, dst)
    return dst


def run(cmd, ctx):
    """Run one user-facing command from the repo root; its output goes to the demo log."""
    with open(ctx["log"], "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ctx["env"])
    if proc.returncode != 0:
        with open(ctx["log"], encoding="utf-8") as f:
            tail = f.read().splitlines()[-25:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}; last lines of {ctx['log']}:\n  "
                           + "\n  ".join(tail))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "output", "demo"), help="output directory")
    ap.add_argument("--steps", type=int, default=None,
                    help="stop LoRA fine-tuning after this many steps (default: the shipped YAML's one epoch)")
    ap.add_argument("--eval-samples", type=int, default=20, help="dev rows to evaluate (default 20)")
    args = ap.parse_args(argv)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ctx = {"out": args.out, "steps": args.steps, "eval_samples": args.eval_samples,
           "log": os.path.join(args.out, "demo.log"), "env": env}
    t_all = time.time()
    for i, (name, fn) in enumerate(STEPS, 1):
        t0 = time.time()
        try:
            what = fn(ctx)
        except Exception as e:  # the demo reports which step failed, then the traceback
            if not isinstance(e, RuntimeError):
                traceback.print_exc()
            print(f"[{i}/{len(STEPS)}] {name}: FAILED: {e}", file=sys.stderr)
            return 1
        what = what.replace(ROOT + os.sep, "")  # paths relative to the repo root
        print(f"[{i}/{len(STEPS)}] {name} ({time.time() - t0:.1f}s): {what}", flush=True)
    print(f"demo finished in {time.time() - t_all:.0f}s; outputs under {args.out}, command log {ctx['log']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
