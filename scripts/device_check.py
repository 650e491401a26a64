"""One prepared accelerator check (``make device-check``, ``make device-check DEVICE=ascend``): runs what only
an accelerator can run and writes one report, ``OUT/device_check.json`` and ``OUT/device_check.md``, with every
figure and a pass/fail per step.

    python scripts/device_check.py [--device cuda|ascend] [--out DIR] [--only STEP,...] [--layers N]
                                   [--no-install] [--dry-run]

``--device cuda`` (one NVIDIA GPU; about 6 minutes on an H100), in order:

* ``torch-cuda``: the CUDA build of torch is installed (``pip install torch==<this version> --index-url
  https://download.pytorch.org/whl/cu128`` when this one is a CPU build, unless ``--no-install``; another index
  with ``GLM_TORCH_CUDA_INDEX``) and sees a GPU;
* ``cuda-tests``: ``pytest -m cuda``, every test marked ``cuda``; a test skipped for any reason other than
  "needs 2 CUDA GPUs" fails the step. Its QLoRA test (4-bit base, one training step) and its FSDP2 test on
  one GPU are reported as the steps ``qlora-4bit`` and ``fsdp2-one-gpu``;
* ``parity-bf16``, ``parity-fp16``: ``scripts/parity.py`` on a random ChatGLM2-6B-shaped model at full width
  (hidden 4096, FFN 13696, 32 heads, 2 key/value groups, vocabulary 65024; ``--layers`` of them, default 2, so
  the float32 MindSpore side fits a 24 GiB host): torch on the GPU in bfloat16 / float16 against MindSpore
  float32 on the CPU, logits and greedy tokens, within the script's default bounds for the dtype;
* ``serve-bench``: ``bench/bench_serve.py --backends torch --device cuda`` (continuous batching vs one
  stream and vs serial ``generate``), its tokens/s and ratios.

``--device ascend`` (one Ascend 910 node, 4 devices):

* ``ascend-tests``: ``pytest -m ascend`` with ``GLM_TEST_DEVICE=Ascend``; any skip fails the step;
* ``semi-auto-20``: a 20-step semi-auto parallel (dp 2 x mp 2) LoRA fine-tune of the tiny model through
  ``scripts/run_distribute.sh`` on devices 0-3 (rank table from ``hccl/hccl_tools.py``, or ``--rank-table``):
  exit 0, 20 losses, all finite, the last five below the first five on average.

A step that cannot run because an earlier one failed is reported ``not run`` and fails the check: nothing
is skipped silently. Exit status: 0 when every step passed, 1 when one failed, 2 on bad arguments.
``--dry-run`` writes the report with each step's command and runs nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
STEPS = {"cuda": ["torch-cuda", "cuda-tests", "qlora-4bit", "fsdp2-one-gpu", "parity-bf16", "parity-fp16",
                  "serve-bench"],
         "ascend": ["ascend-tests", "semi-auto-20"]}
#: steps whose result is read off another step's run (the cuda tests' JUnit report)
FROM_TESTS = {"qlora-4bit": "test_qlora_trains_and_stays_close", "fsdp2-one-gpu": "test_cuda_fsdp2_one_gpu"}
TWO_GPUS = "needs 2 CUDA GPUs"
TORCH_CUDA_INDEX = os.environ.get("GLM_TORCH_CUDA_INDEX", "https://download.pytorch.org/whl/cu128")
GLM2_6B_WIDTH = dict(hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32, kv_channels=128,
                     multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=65024)


class _Parser(argparse.ArgumentParser):
    def error(self, message):                                # one line, exit 2
        self.exit(2, f"device_check: error: {message}\n")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "GLOG_v": "3",
            **extra}


def _run(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, e.stdout or "", f"no answer within {timeout} s")


def _tail(text: str, n: int = 3) -> str:
    lines = [x for x in (text or "").splitlines() if x.strip()]
    return " | ".join(lines[-n:])[-600:]


# ------------------------------------------------------------------------------------------------ CUDA
def step_torch_cuda(a, out):
    probe = [PY, "-c", "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
                       "'gpus': torch.cuda.device_count(), 'name': torch.cuda.get_device_name(0) "
                       "if torch.cuda.is_available() else None}))"]
    if a.dry_run:
        return {"command": " ".join(probe), "install": f"pip install torch==VERSION --index-url {TORCH_CUDA_INDEX}"}
    r = _run(probe, 300)
    info = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    version = str(info.get("torch", "")).split("+")[0]
    cmd_install = [PY, "-m", "pip", "install", "--quiet", f"torch=={version}" if version else "torch", "--index-url",
                   TORCH_CUDA_INDEX]
    installed = False
    if r.returncode == 0 and info.get("cuda") is None and not a.no_install:
        inst = _run(cmd_install, 900)
        if inst.returncode:
            return {"ok": False, "detail": f"pip install of the CUDA torch build failed: {_tail(inst.stderr)}"}
        installed = True
        r = _run(probe, 300)
        info = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    if r.returncode:
        return {"ok": False, "detail": f"torch does not import: {_tail(r.stderr)}"}
    figures = {**info, "installed_now": installed}
    if info.get("cuda") is None:
        return {"ok": False, "figures": figures, "detail": f"torch {info.get('torch')} is a CPU build"
                + (" (--no-install given)" if a.no_install else "")}
    if not info.get("gpus"):
        return {"ok": False, "figures": figures, "detail": "no CUDA GPU visible to torch"}
    return {"ok": True, "figures": figures, "detail": f"{info['name']}, torch {info['torch']} (CUDA {info['cuda']})"}


def _junit(path):
    rows = {}
    for tc in ET.parse(path).iter("testcase"):
        name = tc.get("name", "")
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                rows[name] = (kind, (el.get("message") or "")[:400])
                break
        else:
            rows[name] = ("passed", "")
    return rows


def step_tests(a, out, marker):
    xml = os.path.join(out, f"{marker}_tests.xml")
    cmd = [PY, "-m", "pytest", "-m", marker, "-p", "no:cacheprovider", "-q", f"--junitxml={xml}",
           "-o", "junit_family=xunit1"]
    if a.dry_run:
        return {"command": " ".join(cmd)}
    env = _env(**({"GLM_TEST_DEVICE": "Ascend"} if marker == "ascend" else {}))
    r = _run(cmd, 1800 if marker == "ascend" else 420, env=env)
    if not os.path.exists(xml):
        return {"ok": False, "detail": f"pytest exit {r.returncode}: {_tail(r.stdout + r.stderr)}"}
    rows = _junit(xml)
    a.test_rows = rows
    bad = {n: v for n, v in rows.items() if v[0] in ("failure", "error")
           or (v[0] == "skipped" and not (marker == "cuda" and TWO_GPUS in v[1]))}
    counts = {k: sum(1 for v in rows.values() if v[0] == k) for k in ("passed", "failure", "error", "skipped")}
    figures = {"tests": len(rows), **counts, "results": {n: v[0] + (f": {v[1]}" if v[1] else "") for n, v in rows.items()}}
    if not rows:
        return {"ok": False, "figures": figures, "detail": f"no test marked {marker} ran"}
    detail = (f"{counts['passed']} passed, {counts['failure'] + counts['error']} failed, {counts['skipped']} skipped"
              + (f"; wrong: {', '.join(sorted(bad))}" if bad else ""))
    return {"ok": not bad and r.returncode == 0, "figures": figures,
            "detail": detail}


def step_from_tests(a, out, name):
    test = FROM_TESTS[name]
    if a.dry_run:
        return {"command": f"(the result of {test} in cuda-tests)"}
    rows = getattr(a, "test_rows", None)
    if rows is None:
        return {"ok": False, "detail": "not run: cuda-tests did not run"}
    hits = {n: v for n, v in rows.items() if n == test or n.startswith(test + "[")}
    if not hits:
        return {"ok": False, "detail": f"{test} was not collected"}
    ok = all(v[0] == "passed" for v in hits.values())
    return {"ok": ok, "detail": "; ".join(f"{n}: {v[0]}" + (f" ({v[1]})" if v[1] else "") for n, v in hits.items())}


def _random_6b_shaped(folder, layers):
    """A random ChatGLM2-6B-shaped HF directory at full width, ``layers`` deep, float16, with a tokenizer."""
    code = (
        "import sys, shutil, torch\n"
        "from glm_common.config import preset\n"
        "from torch_glm.model import ChatGLM2ForConditionalGeneration as M\n"
        "torch.manual_seed(0)\n"
        f"cfg = preset('glm2_6b', num_layers={layers}, torch_dtype='float16', **{GLM2_6B_WIDTH!r})\n"
        "m = M(cfg)\n"
        "with torch.no_grad():\n"
        "    for p in m.parameters():\n"
        "        p.normal_(0.0, 0.02)\n"
        "m.half().save_pretrained(sys.argv[1])\n"
        "shutil.copy('tests/fixtures/tokenizer/tiny_glm2_sp.model', sys.argv[1] + '/tokenizer.model')\n")
    return [PY, "-c", code, folder]


def step_parity(a, out, dtype):
    model = os.path.join(a.work, "glm2_6b_shaped")
    report = os.path.join(out, f"parity_{dtype}.json")
    make = _random_6b_shaped(model, a.layers)
    cmd = [PY, "scripts/parity.py", "--hf-dir", model, "--torch-device", "cuda", "--torch-dtype", dtype,
           "--ms-dtype", "fp32", "--generate", "8", "--report", report, "--no-progress"]
    if a.dry_run:
        return {"command": " ".join(cmd), "model": f"random, full width, {a.layers} layers ({' '.join(make[:2])} ...)"}
    if not os.path.isdir(model):
        r = _run(make, 600, env=_env())
        if r.returncode:
            return {"ok": False, "detail": f"could not write the random model: {_tail(r.stderr)}"}
    r = _run(cmd, 900, env=_env())
    figures = json.load(open(report)) if os.path.exists(report) else {}
    return {"ok": r.returncode == 0, "figures": figures,
            "detail": _tail(r.stdout, 4) if r.returncode == 0 else f"exit {r.returncode}: {_tail(r.stdout + r.stderr, 4)}"}


def step_serve_bench(a, out):
    js = os.path.join(out, "serve_bench.json")
    cmd = [PY, "bench/bench_serve.py", "--backends", "torch", "--device", "cuda", "--rounds", "3", "--json", js]
    if a.dry_run:
        return {"command": " ".join(cmd)}
    r = _run(cmd, 600, env=_env())
    figures = json.load(open(js)) if os.path.exists(js) else {}
    return {"ok": r.returncode == 0 and bool(figures), "figures": figures,
            "detail": _tail(r.stdout, 3) if r.returncode == 0 else f"exit {r.returncode}: {_tail(r.stderr)}"}


# ------------------------------------------------------------------------------------------------ Ascend
def _semi_auto_yaml(path):
    import yaml
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny", "run_tiny_lora.yaml"), encoding="utf-8"))
    cfg["context"]["device_target"] = "Ascend"
    cfg["parallel"]["parallel_mode"] = 1
    cfg["parallel_config"].update(data_parallel=2, model_parallel=2, pipeline_stage=1)
    cfg["load_checkpoint"] = os.path.join(ROOT, "tests", "fixtures", "model", "tiny_glm2")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, allow_unicode=True)


def step_semi_auto(a, out):
    run_dir = os.path.join(out, "semi_auto_20")
    yaml_path = os.path.join(a.work, "semi_auto.yaml")
    table = a.rank_table or os.path.join(a.work, "hccl_4p.json")
    make_table = [PY, "hccl/hccl_tools.py", "--device_num", "[0,4)", "--output", a.work]
    cmd = ["bash", "scripts/run_distribute.sh", table, yaml_path, "[0,4)", "finetune", "--", "--train_steps", "20",
           "--no_progress", "--output_dir", run_dir]
    if a.dry_run:
        return {"command": " ".join(cmd), "rank_table": a.rank_table or " ".join(make_table)}
    _semi_auto_yaml(yaml_path)
    if not a.rank_table:
        r = _run(make_table, 120, env=_env())
        made = [f for f in os.listdir(a.work) if f.startswith("hccl_4p") and f.endswith(".json")]
        if r.returncode or not made:
            return {"ok": False, "detail": f"hccl_tools.py could not write a rank table: {_tail(r.stderr)}"}
        table = os.path.join(a.work, made[0])
        cmd[2] = table
    r = _run(cmd, 1200, env=_env())
    log = os.path.join(run_dir, "loss_log.jsonl")
    losses = [json.loads(x)["loss"] for x in open(log)] if os.path.exists(log) else []
    figures = {"losses": losses}
    ok = (r.returncode == 0 and len(losses) == 20 and all(math.isfinite(x) for x in losses)
          and sum(losses[-5:]) < sum(losses[:5]))
    detail = (f"20 losses, {losses[0]:.4f} -> {losses[-1]:.4f}" if ok else
              f"exit {r.returncode}, {len(losses)} losses: {_tail(r.stderr)}")
    return {"ok": ok, "figures": figures, "detail": detail}


RUNNERS = {
    "torch-cuda": step_torch_cuda,
    "cuda-tests": lambda a, out: step_tests(a, out, "cuda"),
    "qlora-4bit": lambda a, out: step_from_tests(a, out, "qlora-4bit"),
    "fsdp2-one-gpu": lambda a, out: step_from_tests(a, out, "fsdp2-one-gpu"),
    "parity-bf16": lambda a, out: step_parity(a, out, "bf16"),
    "parity-fp16": lambda a, out: step_parity(a, out, "fp16"),
    "serve-bench": step_serve_bench,
    "ascend-tests": lambda a, out: step_tests(a, out, "ascend"),
    "semi-auto-20": step_semi_auto,
}


# ------------------------------------------------------------------------------------------------ report
def write_report(report: dict, out: str) -> None:
    with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    lines = [f"# Device check: {report['device']}", "",
             f"{report['verdict']} ({report['passed']} of {len(report['steps'])} steps passed); "
             f"{report['machine']}; {report['started']}", "",
             "| step | result | seconds | detail |", "| --- | --- | --- | --- |"]
    for s in report["steps"]:
        detail = str(s.get("detail") or s.get("command") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['name']} | {s['result']} | {s.get('seconds', '')} | {detail} |")
    for s in report["steps"]:
        if s.get("figures"):
            lines += ["", f"## {s['name']}", "", "```json", json.dumps(s["figures"], indent=2, ensure_ascii=False)[:20000],
                      "```"]
    with open(os.path.join(out, "device_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = _Parser(prog="python scripts/device_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (one NVIDIA GPU) or ascend (one Ascend node)")
    ap.add_argument("--out", default=os.path.join(ROOT, "output", "device_check"), help="report folder")
    ap.add_argument("--only", help="comma-separated steps of the device (default: all)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the full-width parity model (default 2)")
    ap.add_argument("--rank-table", help="ascend: the node's rank table (default: made with hccl/hccl_tools.py)")
    ap.add_argument("--no-install", action="store_true", help="never pip-install the CUDA build of torch")
    ap.add_argument("--dry-run", action="store_true", help="write the report with each step's command; run nothing")
    a = ap.parse_args(argv)
    if a.device not in STEPS:
        ap.error(f"--device: {a.device!r}; expected one of {', '.join(STEPS)}")
    steps = STEPS[a.device]
    if a.only:
        wanted = [s.strip() for s in a.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in steps]
        if unknown:
            ap.error(f"--only: {', '.join(unknown)} is not a step of --device {a.device} ({', '.join(steps)})")
        steps = [s for s in steps if s in wanted]
    if a.layers < 1:
        ap.error(f"--layers: expected a positive number, got {a.layers}")
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        ap.error(f"--out: {a.out}: {e.strerror}")
    a.work = tempfile.mkdtemp(prefix="device_check_")
    report = {"device": a.device, "machine": f"{platform.node()}, {platform.machine()}, Python {platform.python_version()}",
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": a.dry_run, "steps": []}
    gate_failed = None                       # the device step failed: nothing after it can run
    try:
        for name in steps:
            t0 = time.monotonic()
            if gate_failed:
                res = {"ok": False, "detail": f"not run: {gate_failed} failed"}
            else:
                try:
                    res = RUNNERS[name](a, a.out)
                except Exception as e:       # noqa: BLE001 - a broken step is reported, never hidden
                    res = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
            res = {"name": name, **res}
            res["result"] = "planned" if a.dry_run else ("passed" if res.get("ok") else "FAILED")
            res["seconds"] = round(time.monotonic() - t0, 1)
            report["steps"].append(res)
            if not a.dry_run:
                print(f"{res['result']:<8} {name}: {res.get('detail', '')}", flush=True)
            else:
                print(f"planned  {name}: {res.get('command', '')}", flush=True)
            if name in ("torch-cuda",) and not a.dry_run and not res.get("ok"):
                gate_failed = name
    finally:
        shutil.rmtree(a.work, ignore_errors=True)
    report["passed"] = sum(s["result"] == "passed" for s in report["steps"])
    failed = [s["name"] for s in report["steps"] if s["result"] == "FAILED"]
    report["verdict"] = "planned" if a.dry_run else ("PASSED" if not failed else "FAILED: " + ", ".join(failed))
    write_report(report, a.out)
    print(f"device check {report['verdict']}; report: {os.path.join(a.out, 'device_check.md')} (and .json)")
    return 0 if a.dry_run or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
