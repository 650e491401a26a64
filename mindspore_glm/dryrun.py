"""Compile a run YAML's real training step for the ranks of a cluster, without the cluster: MindSpore's
DryRun (``MS_SIMULATION_LEVEL=1``: the graph is compiled for one simulated rank of ``RANK_SIZE`` and its
device memory counted), beside the memory plan.

    python -m mindspore_glm.dryrun --config YAML [--devices N] [--ranks 0,7] [--num-layers L] [--json]
    python -m mindspore_glm.plan --config YAML --devices N --compile        (the same)

What is compiled is what ``scripts/run_distribute.sh`` runs: :func:`mindspore_glm.train.build_model` (the
same cells, ``pet_config``, strategies, pipeline stages, recompute) with its weights left uninitialised,
and :func:`mindspore_glm.train.build_step` (optimizer, loss scale, clipping, gradient reduction) under the
YAML's ``set_auto_parallel_context`` (:func:`mindspore_glm.parallel.init_parallel`), on one batch of the
shape the data pipeline gives. Each rank that differs (rank 0 and the last rank of every pipeline stage) is
compiled in its own process. Per rank it prints MindSpore's peak ("Used peak memory usage (without
fragments)", operator inputs and outputs, no kernel workspace) beside the plan's total for that rank's
stage (:mod:`glm_common.memory_plan`) and their ratio. A layout MindSpore refuses is one line: the rank,
MindSpore's message and the YAML key that governs the operator it names.

On a machine without CANN the Ascend plugin loads the stand-in libraries of :mod:`mindspore_glm.fakecann`
(built with gcc into a cache folder); where CANN is installed (``ASCEND_HOME_PATH``) it loads those.
``--strategy-dir`` keeps each rank's strategy file (MindSpore's ``strategy_ckpt_save_file``), which
``convert/merge_shards.py --strategy`` reads.

exit status: 0 every rank compiled, 1 a rank did not compile, 2 bad input.

There is no ``torch_glm`` twin of this module: it checks MindSpore's semi-auto-parallel compiler, which torch
has no counterpart of (torch's sharded training, FSDP2, runs for real on CPU under ``torchrun``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

__all__ = ["DryRunError", "ranks_that_differ", "prepare_config", "compile_rank", "dryrun", "format_report",
           "parse_peaks", "blame_key", "main"]

#: simulation level: 1 = compile + memory statistics (0 compiles only; 2 and 3 need a device)
SIMULATION_LEVEL = 1
_PEAK = {"used": re.compile(r"Used peak memory usage \(without fragments\):\s*([\d.]+)\s*([KMGT]?)"),
         "actual": re.compile(r"Actual peak memory usage \(with fragments\):\s*([\d.]+)\s*([KMGT]?)")}
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_RESULT = "DRYRUN_RESULT "


class DryRunError(ValueError):
    """Bad input for a DryRun (one line naming the file or the option)."""


# ------------------------------------------------------------------------------------------- the parent
def ranks_that_differ(devices: int, pipeline_stage: int) -> List[int]:
    """Rank 0 and the last rank of each pipeline stage (MindSpore puts rank r on stage
    ``r // (devices / pipeline_stage)``); in a stage the ranks differ only by which slice they hold."""
    per = devices // pipeline_stage
    return sorted({0} | {(s + 1) * per - 1 for s in range(pipeline_stage)})


def prepare_config(path: str, devices: Optional[int] = None, num_layers: Optional[int] = None) -> dict:
    """The YAML mapping as the compile sees it: ``device_target: Ascend``, ``data_parallel`` =
    ``devices / (model_parallel x pipeline_stage)`` when ``devices`` is given, ``num_layers`` when given."""
    from glm_common.run_config import RunConfigError, load_run_config
    try:
        raw = load_run_config(path)
    except RunConfigError as e:
        raise DryRunError(str(e)) from None
    raw.setdefault("context", {})
    raw["context"] = dict(raw["context"] or {}, device_target="Ascend")
    pc = dict(raw.get("parallel_config") or {})
    mp, pp = int(pc.get("model_parallel", 1) or 1), int(pc.get("pipeline_stage", 1) or 1)
    if devices is not None:
        if devices < 1 or devices % (mp * pp):
            raise DryRunError(f"--devices: {devices} is not a multiple of model_parallel x pipeline_stage "
                              f"({mp} x {pp}) of {path}")
        pc["data_parallel"] = devices // (mp * pp)
        raw["parallel_config"] = pc
    if num_layers is not None:
        if num_layers < 1:
            raise DryRunError(f"--num-layers: must be positive, got {num_layers}")
        model = dict(raw.get("model") or {})
        model["model_config"] = dict(model.get("model_config") or {}, num_layers=num_layers)
        raw["model"] = model
    devs = int(pc.get("data_parallel", 1) or 1) * mp * pp
    if devs > 1 and not raw.get("use_parallel", False):
        raise DryRunError(f"{path}: use_parallel: False with {devs} devices; set use_parallel: True")
    return raw


def parse_peaks(text: str) -> dict:
    """``{"used": bytes, "actual": bytes}`` from MindSpore's exit statistics (missing ones left out)."""
    out = {}
    for k, rx in _PEAK.items():
        m = rx.findall(text)
        if m:
            v, u = m[-1]
            out[k] = int(float(v) * _UNIT[u])
    return out


#: operator (as MindSpore names it in a message) -> the YAML key that sets its strategy or its presence
_OP_KEYS = (
    ("FlashAttentionScore", "model.model_config.use_flash_attention"),
    ("Gather", "parallel_config.vocab_emb_dp"),
    ("MatMul", "parallel_config.model_parallel"),
    ("pipeline", "parallel_config.pipeline_stage"),
    ("micro", "parallel_config.micro_batch_num"),
    ("optimizer", "parallel.enable_parallel_optimizer"),
    ("recompute", "recompute_config"),
    ("accu_grads", "runner_config.gradient_accumulation_steps"),
    ("device_num", "parallel_config.data_parallel"),
    ("strategy", "parallel_config"),
)


def blame_key(message: str) -> str:
    """The YAML key that governs what MindSpore's ``message`` names (a best guess; ``parallel_config``
    when it names nothing we know)."""
    m = re.match(r"\S+?: (\S+): ", message)           # our own one-line errors name their key already
    if m and ("." in m.group(1) or m.group(1).endswith(":")):
        return m.group(1).rstrip(":")
    for word, key in _OP_KEYS:
        if word.lower() in message.lower():
            return key
    return "parallel_config"


def _first_line(text: str) -> str:
    """MindSpore's message without its C++ stack and advice blocks."""
    lines = [ln.strip() for ln in text.splitlines()]
    msg = []
    for ln in lines:
        if ln.startswith(("----", "- C++ Call Stack", "- Framework", "- Ascend Error", "(See file")):
            break
        if ln:
            msg.append(ln)
    return " ".join(msg)[:600]


def compile_rank(config_path: str, rank: int, devices: int, num_layers: Optional[int] = None,
                 strategy_dir: Optional[str] = None, timeout: float = 900, env: Optional[dict] = None,
                 soc: str = "", source: str = "") -> dict:
    """Compile rank ``rank`` of ``devices`` in a child process under ``MS_SIMULATION_LEVEL=1``; returns
    ``{"rank", "ok", "peak_bytes", "actual_peak_bytes", "error", "key", "seconds", "host_rss_bytes"}``."""
    from mindspore_glm.fakecann import cann_env
    env = cann_env(env)
    env.update(MS_SIMULATION_LEVEL=str(SIMULATION_LEVEL), RANK_SIZE=str(devices), RANK_ID=str(rank),
               GLOG_v="2", PYTHONUNBUFFERED="1", GLM2_DRYRUN_SOURCE=source or config_path)
    if soc:
        env["GLM2_ASCEND_SOC"] = soc
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "mindspore_glm.dryrun", "--child", "--config", config_path,
           "--devices", str(devices), "--ranks", str(rank)]
    if num_layers:
        cmd += ["--num-layers", str(num_layers)]
    work = tempfile.mkdtemp(prefix="glm2-dryrun-")
    cmd += ["--strategy-dir", strategy_dir or work]
    try:
        r = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + "\n" + r.stderr
    except subprocess.TimeoutExpired:
        return {"rank": rank, "ok": False, "error": f"did not compile within {timeout:g} s",
                "key": "--timeout", "peak_bytes": None, "actual_peak_bytes": None}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"rank": rank, "ok": False, "error": None, "key": None}
    for ln in out.splitlines():
        if ln.startswith(_RESULT):
            res.update(json.loads(ln[len(_RESULT):]))
    peaks = parse_peaks(out)
    res["peak_bytes"] = peaks.get("used")
    res["actual_peak_bytes"] = peaks.get("actual")
    if res["ok"] and res["peak_bytes"] is None:
        res["ok"] = False
        res["error"] = "compiled, but MindSpore printed no peak memory (is GLOG_v above 2?)"
    if not res["ok"] and not res["error"]:
        tail = [ln for ln in out.splitlines() if ln.strip()][-3:]
        res["error"] = f"the compile process exited with status {r.returncode}: " + " | ".join(tail)[-600:]
    if not res["ok"] and not res["key"]:
        res["key"] = blame_key(res["error"])
    return res


def dryrun(config_path: str, devices: Optional[int] = None, ranks: Optional[Sequence[int]] = None,
           num_layers: Optional[int] = None, strategy_dir: Optional[str] = None, timeout: float = 900,
           jobs: int = 1, soc: str = "") -> dict:
    """Compile the ranks that differ (or ``ranks``) of ``config_path``, ``jobs`` processes at a time.

    Returns ``{"config", "devices", "layout", "method", "layers", "plan", "ranks"}``, each rank a
    :func:`compile_rank` result plus ``stage``, ``plan_bytes`` and ``ratio`` (peak / plan)."""
    from glm_common.memory_plan import PlanError, layout_from_config, plan_memory
    raw = prepare_config(config_path, devices, num_layers)
    try:
        plan = plan_memory(layout_from_config(raw, source=config_path))
    except (PlanError, ValueError) as e:
        raise DryRunError(str(e)) from None
    lay = plan["layout"]
    world = lay["devices"]
    ranks = list(ranks) if ranks else ranks_that_differ(world, lay["pipeline_stage"])
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise DryRunError(f"--ranks: {bad[0]} is not a rank of {world} devices")
    fd, prepared = tempfile.mkstemp(prefix="glm2-dryrun-", suffix=".yaml")
    import yaml
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    try:
        from concurrent.futures import ThreadPoolExecutor
        per = world // lay["pipeline_stage"]
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            rows = list(pool.map(lambda r: compile_rank(prepared, r, world, None, strategy_dir, timeout,
                                                      soc=soc, source=config_path), ranks))
        for row in rows:
            if row.get("error"):
                row["error"] = row["error"].replace(prepared, config_path)
            row["stage"] = row["rank"] // per
            row["plan_bytes"] = plan["stage_totals_bytes"][row["stage"]]
            row["ratio"] = row["peak_bytes"] / row["plan_bytes"] if row.get("peak_bytes") else None
    finally:
        os.unlink(prepared)
    return {"config": config_path, "devices": world, "layout": lay, "method": plan["method"],
            "layers": plan["model"]["layers"], "plan": plan, "ranks": rows}


def _gb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def format_report(rep: dict) -> str:
    lay = rep["layout"]
    head = (f"DryRun of {rep['config']} ({rep['method']}, {rep['layers']} layers): {rep['devices']} devices = "
            f"dp {lay['data_parallel']} x mp {lay['model_parallel']} x pp {lay['pipeline_stage']}"
            + (", optimizer shard" if lay["optimizer_shard"] else "") + (", recompute" if lay["recompute"] else "")
            + f"; MS_SIMULATION_LEVEL={SIMULATION_LEVEL}")
    lines = [head, f"  {'rank':>4} {'stage':>5} {'MindSpore peak':>15} {'plan':>10} {'peak/plan':>9}"]
    for r in rep["ranks"]:
        if r["ok"]:
            lines.append(f"  {r['rank']:>4} {r['stage']:>5} {_gb(r['peak_bytes']):>15} {_gb(r['plan_bytes']):>10} "
                         f"{r['ratio']:>9.2f}")
        else:
            lines.append(f"  {r['rank']:>4} {r['stage']:>5} does not compile ({r['key']}): {r['error']}")
    for w in sorted({w for r in rep["ranks"] for w in r.get("warnings") or ()}):
        lines.append(f"  warning: {w}")
    lines.append("  MindSpore peak: 'Used peak memory usage (without fragments)', operator inputs and outputs "
                 "(no kernel workspace); plan: python -m mindspore_glm.plan")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the child
def _child(config_path: str, rank: int, devices: int, strategy_dir: str) -> int:
    """Build and compile the training step of one rank (we are under MS_SIMULATION_LEVEL); print one
    ``DRYRUN_RESULT {json}`` line."""
    import time
    import warnings

    def report(**kw):
        print(_RESULT + json.dumps(kw), flush=True)

    t0 = time.time()
    try:
        import numpy as np
        import mindspore as ms
        from mindspore import Tensor
        from glm_common.run_config import RunConfigError, load_run_config, settings_from_config
        from mindspore_glm.parallel import ParallelError, dataset_split, init_parallel, check_scaleout
        from mindspore_glm.train import build_model, build_step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = settings_from_config(load_run_config(config_path), source=config_path, warn=False)
        s.source = os.environ.get("GLM2_DRYRUN_SOURCE", config_path)
        s.output_dir = strategy_dir      # <output_dir>/strategy/ckpt_strategy_rank_<rank>.ckpt
        s.progress = False
        check_scaleout(s, devices)
    except (RunConfigError, ParallelError) as e:
        report(ok=False, error=str(e), key=blame_key(str(e)))
        return 1
    try:
        ms.set_context(mode=ms.GRAPH_MODE, device_target="Ascend")
        if s.use_parallel:
            from mindspore.communication import init
            init()
            init_parallel(s, devices, rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, params = build_model(s, weights=False)
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        flash = any(layer.self_attention.use_flash_attention for layer in model.transformer.encoder.layers)
        seq = s.max_source_length + s.max_target_length + 1
        batch = dataset_split(s, rank, devices)[2]
        lrs = np.full(4, s.learning_rate, np.float32)
        from mindspore_glm.train_step import TrainOneStepCell
        TrainOneStepCell.unconditional_update = True
        _, step = build_step(model, params, s, lrs, devices if s.use_parallel else 1)
        ids = Tensor(np.zeros((batch, seq), np.int32))
        step.compile(ids, ids)
        step(ids, ids)                 # simulated: no kernel runs; the memory statistics are of this step
    except (RunConfigError, ParallelError) as e:
        report(ok=False, error=str(e), key=blame_key(str(e)))
        return 1
    except Exception as e:  # MindSpore's compiler: its message, without the C++ stack
        msg = _first_line(f"{type(e).__name__}: {e}")
        report(ok=False, error=msg, key=blame_key(msg))
        return 1
    try:
        import psutil
        rss = psutil.Process().memory_info().rss
    except ImportError:
        rss = None
    report(ok=True, seconds=round(time.time() - t0, 1), host_rss_bytes=rss, batch=batch, seq=seq,
           flash_attention=flash, warnings=said)
    return 0


# ------------------------------------------------------------------------------------------- CLI
def build_parser(prog: str = "python -m mindspore_glm.dryrun") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description="Compile a run YAML's training step for each rank that differs with MindSpore's "
                               "DryRun (no device needed) and print MindSpore's peak memory beside the memory plan.")
    ap.add_argument("--config", required=True, help="run YAML")
    ap.add_argument("--devices", type=int, default=None,
                    help="devices of the run (default: the YAML's data_parallel x model_parallel x pipeline_stage)")
    ap.add_argument("--ranks", default=None, help="comma-separated ranks to compile (default: rank 0 and the last "
                                                  "rank of each pipeline stage)")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="compile this many layers instead of the YAML's num_layers (plan likewise)")
    ap.add_argument("--strategy-dir", default=None,
                    help="keep each rank's strategy file in DIR/strategy/ (for convert/merge_shards.py --strategy)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per rank (default 1800)")
    ap.add_argument("--soc", default="", help="the Ascend chip to compile for where none is present, as MindSpore "
                                              "names it: ascend910 (910A), ascend910b (Atlas A2); default: unknown")
    ap.add_argument("--jobs", type=int, default=1, help="ranks compiled at once (default 1; each takes a "
                                                        "few GB of host memory for a 6B model)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m mindspore_glm.dryrun") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else None
    except ValueError:
        print(f"error: --ranks: expected comma-separated integers, got {args.ranks!r}", file=sys.stderr)
        return 2
    if args.child:
        return _child(args.config, ranks[0], args.devices, args.strategy_dir)
    from mindspore_glm.fakecann import FakeCannError
    try:
        rep = dryrun(args.config, args.devices, ranks, args.num_layers, args.strategy_dir, args.timeout, args.jobs,
                     args.soc)
    except (DryRunError, FakeCannError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        rep = {k: v for k, v in rep.items() if k != "plan"}
        print(json.dumps(rep, indent=1))
    else:
        print(format_report(rep))
    return 0 if all(r["ok"] for r in rep["ranks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
