"""The launch plan of ``scripts/run_distribute.sh``: which processes a distributed :mod:`mindspore_glm.run`
starts, with which variables, working directories, logs and command lines.

    bash scripts/run_distribute.sh RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA ...]
    python -m mindspore_glm.launch [options] RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] ...

The arguments are mindformers' ``run_distribute.sh`` ones: ``DEVICE_RANGE`` ``"[a,b)"`` (``"[a,b]"`` reads
the same, ``b`` excluded); without ``RANK_SIZE`` one node starts ranks ``0..b-a-1`` on devices ``a..b-1``;
with ``RANK_SIZE`` (several nodes, one launch per node) this node starts the global ranks ``a..b-1`` on
devices ``0..b-a-1``. With a rank table each rank's ``DEVICE_ID`` is the device its table entry names
(:func:`hccl.validate.rank_plan`; the table must name the devices of the range, and only devices a node has). ``predict`` takes the texts (or one data file)
after it. Arguments after ``--`` go to every rank's ``mindspore_glm.run`` (``-- --train_steps 10``).
``eval`` and ``predict`` split the samples (texts) over the ranks; rank 0 writes the gathered results.

Everything is checked before a process starts: the rank table (:func:`hccl.validate.check_file`: shape,
rank ids, device IPs, the range and ``RANK_SIZE`` against it), the run YAML (parsed and checked by
:func:`glm_common.run_config.settings_from_config`), the range, ``RUN_STATUS``, ``RANK_SIZE``.

How ranks start, by the YAML's ``context.device_target``:

* ``Ascend``: rank-table launch, as mindformers does it. Each rank gets ``RANK_TABLE_FILE``, ``RANK_SIZE``,
  ``RANK_ID``, ``DEVICE_ID`` and runs ``python -m mindspore_glm.run --config CFG --use_parallel True
  --run_mode MODE --device_id D``; the table is required.
* ``CPU`` (and ``GPU``): a MindSpore dynamic cluster on this host, the variables ``msrun`` sets: one
  scheduler process (``MS_ROLE=MS_SCHED``) and one worker per rank (``MS_ROLE=MS_WORKER``,
  ``MS_NODE_ID`` = rank id, which MindSpore makes the rank), all with ``MS_SCHED_HOST=127.0.0.1``,
  ``MS_SCHED_PORT`` (a free port, or ``--port``), ``MS_WORKER_NUM``, ``MS_TOPO_TIMEOUT``; communication
  is gloo on CPU. Data parallel (``parallel_mode: 0``) runs this way; semi-auto parallel needs Ascend or
  GPU. No rank table is needed: pass ``-`` (or ``none``); a table that is given is checked the same way
  and exported, its device IPs are not used. One node only (``RANK_SIZE``, if given, must equal the
  number of ranks).
* ``--launcher msrun``: MindSpore's own ``msrun`` starts scheduler and workers (``--join True``, node
  rank from the range) and this supervisor watches it; worker logs are msrun's
  ``output/log/msrun/worker_N.log``. On Ascend the devices of the range (with a rank table: the devices
  its entries for this node's ranks name, in rank order) are made visible with ``ASCEND_RT_VISIBLE_DEVICES``;
  msrun gives its worker ``i`` ``DEVICE_ID=i``, an index into them, and the ranks take that (a dynamic
  cluster's device id comes from its launcher: the YAML's ``context.device_id`` is not used, as mindformers
  drops it; :func:`launcher_device_id`). Use it where msrun's own features are wanted (core binding, cluster
  recovery); the failed rank is read from msrun's log.

Files (``--output DIR``, default ``./output``):

* ``DIR/log/rank_N/worker.log``: the rank's stdout and stderr (``DIR/log/scheduler/scheduler.log``);
* ``DIR/work/rank_N/``: the rank's working directory (MindSpore writes graph dumps, compile caches and
  the like into the current directory; one each keeps ranks apart, like mindformers' ``mf_parallelN``);
* ``DIR/work/run_config.yaml``: the YAML the ranks read: the given one with its relative paths (keys
  ``output_dir``, ``load_checkpoint``, ``*_dir``, ``*_file``, ``*_path``) made absolute against the
  launch directory, so they mean what they mean to a single-process run started here.

This module plans and checks; it imports no framework (the launcher process stays free of MindSpore).
The processes are run by :class:`glm_common.supervisor.Supervisor`; :mod:`mindspore_glm.launch` is the
command line and the dynamic cluster's scheduler.

Supervision: the launcher waits for every rank. When one exits non-zero (or is killed), it stops the
others (SIGTERM to each rank's process group, SIGKILL to what is left after ``--grace`` seconds),
prints which rank failed, its exit status and the tail of its log, and exits 1. SIGINT (Ctrl-C),
SIGTERM and SIGHUP to the launcher stop all ranks the same way (exit 130/143/129). ``--dry-run`` (or
``GLM_DRY_RUN=1``) prints the plan and starts nothing. Bad arguments: one line each, exit 2.

``GLM_LAUNCH_WORKER`` (a command line) replaces ``python -m mindspore_glm.run`` and ``GLM_LAUNCH_SCHEDULER``
the scheduler command, for testing the supervision without MindSpore.

There is no ``torch_glm`` twin of this module: for PyTorch, ``torchrun`` is the launcher.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from glm_common.supervisor import TAIL_LINES, Proc

__all__ = ["LaunchError", "Plan", "build_plan", "format_plan", "resolve_paths", "free_port", "write_run_config",
           "RUN_STATUSES", "NO_TABLE", "memory_refusal", "launcher_device_id"]

RUN_STATUSES = ("train", "finetune", "eval", "predict")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TABLE = ("-", "none", "None", "NONE", "")
_PATH_KEYS = ("output_dir", "load_checkpoint", "checkpoint_name_or_path")
_PATH_SUFFIXES = ("_dir", "_file", "_path", "_or_dir")


class LaunchError(ValueError):
    """Launch arguments that cannot be run; ``errors`` holds one line per problem."""

    def __init__(self, errors):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


@dataclass
class Plan:
    """What a launch starts, in order (scheduler first)."""

    mode: str                      # "ascend" (rank table), "cluster" (dynamic cluster), "msrun"
    device_target: str
    run_status: str
    config: str                    # the YAML given
    run_config: str                # the YAML the ranks read (relative paths resolved)
    resolved: dict                 # its content
    table: Optional[str]
    rank_size: int
    output: str
    procs: List[Proc] = field(default_factory=list)
    port: Optional[int] = None
    memory: Optional[dict] = None  # the memory plan of a train/finetune run (glm_common.memory_plan)
    lock_dir: Optional[str] = None  # the training output_dir whose lock this launch holds (rank 0's node)


# ---------------------------------------------------------------------------------------- planning
def launcher_device_id(environ=None) -> Optional[int]:
    """The device id a rank of a MindSpore dynamic cluster (``MS_ROLE`` set: msrun, or this launcher's CPU/GPU
    cluster) gets from its launcher (``DEVICE_ID``; msrun's is the worker's index into
    ``ASCEND_RT_VISIBLE_DEVICES``), which replaces the YAML's ``context.device_id`` as in mindformers; None
    outside a dynamic cluster or without ``DEVICE_ID``."""
    environ = os.environ if environ is None else environ
    if not environ.get("MS_ROLE") or not str(environ.get("DEVICE_ID", "")).isdigit():
        return None
    return int(environ["DEVICE_ID"])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; another process could still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_path_key(key) -> bool:
    return isinstance(key, str) and (key in _PATH_KEYS or key.endswith(_PATH_SUFFIXES))


def resolve_paths(node, base: str):
    """A copy of the YAML mapping ``node`` with the relative path values (keys ``output_dir``,
    ``load_checkpoint``, ``*_dir``, ``*_file``, ``*_path``) joined to ``base``; URLs and empty values stay."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if _is_path_key(k) and isinstance(v, str) and v and not os.path.isabs(v) and "://" not in v \
                    and v not in ("None", "null"):
                out[k] = os.path.normpath(os.path.join(base, os.path.expanduser(v)))
            else:
                out[k] = resolve_paths(v, base)
        return out
    if isinstance(node, list):
        return [resolve_paths(v, base) for v in node]
    return node


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_distribute.sh",
        usage="bash scripts/run_distribute.sh [options] RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS "
              "[RANK_SIZE] [PREDICT_DATA ...] [-- RUN_ARGS ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a data-parallel mindspore_glm.run on several devices and supervise it: a rank that "
                    "fails stops the others; Ctrl-C stops all.",
        epilog="""positional arguments:
  RANK_TABLE_FILE  HCCL rank table (hccl/hccl_tools.py, hccl/merge_hccl.py); required on Ascend;
                   '-' or 'none' in CPU mode (a table given there is checked, its IPs are not used)
  CONFIG_PATH      run YAML (configs/glm2/*.yaml, configs/tiny/*.yaml); context.device_target picks
                   the launch: Ascend = rank table, CPU/GPU = MindSpore dynamic cluster on 127.0.0.1
  DEVICE_RANGE     '[a,b)' ('[a,b]' reads the same, b excluded); one node: ranks 0..b-a-1 on devices
                   a..b-1; with RANK_SIZE: this node's global ranks a..b-1 on devices 0..b-a-1
  RUN_STATUS       train | finetune | eval | predict (eval/predict: each rank answers its share of
                   the samples or texts; rank 0 gathers them and writes the results)
  RANK_SIZE        total ranks of a multi-node launch (the rank table's device count)
  PREDICT_DATA     with predict: texts, or one data file
  RUN_ARGS         after '--': more mindspore_glm.run flags for every rank, e.g. -- --train_steps 10

files: OUTPUT/log/rank_N/worker.log (log of rank N), OUTPUT/log/scheduler/scheduler.log,
       OUTPUT/work/rank_N/ (working directory of rank N), OUTPUT/work/run_config.yaml (the YAML the
       ranks read: relative paths made absolute against the launch directory)
environment: GLM_DRY_RUN=1 (same as --dry-run), GLM_LAUNCH_GRACE (seconds, same as --grace),
       GLM_LAUNCH_WORKER / GLM_LAUNCH_SCHEDULER (replace the rank / scheduler command; for tests)
exit status: 0 all ranks succeeded; 1 a rank failed; 2 bad arguments; 128+N stopped by signal N

examples:
  bash scripts/run_distribute.sh hccl_8p_01234567_10.0.0.1.json configs/glm2/run_glm2_6b_finetune.yaml '[0,8]' finetune
  bash scripts/run_distribute.sh cluster_16p.json configs/glm2/run_glm2_6b_lora.yaml '[8,16]' finetune 16
  bash scripts/run_distribute.sh - configs/tiny/run_tiny_lora.yaml '[0,2]' finetune -- --train_steps 4
  bash scripts/run_distribute.sh - configs/tiny/run_tiny_lora_eval.yaml '[0,2]' predict "类型#裙*颜色#红色"
""")
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the plan, start nothing (env GLM_DRY_RUN=1)")
    p.add_argument("--launcher", choices=("native", "msrun"), default="native",
                   help="native (default): this supervisor starts every process; msrun: MindSpore's msrun "
                        "starts them and this supervisor watches it")
    p.add_argument("--output", default="output", metavar="DIR", help="root of log/ and work/ (default ./output)")
    p.add_argument("--grace", type=float, default=None, metavar="S",
                   help="seconds between SIGTERM and SIGKILL when stopping ranks (default 10, env GLM_LAUNCH_GRACE)")
    p.add_argument("--port", type=int, default=None, help="scheduler port of a dynamic cluster (default: a free one)")
    p.add_argument("--master-addr", default="127.0.0.1",
                   help="scheduler address for --launcher msrun (default 127.0.0.1)")
    p.add_argument("--cluster-timeout", type=int, default=600, metavar="S",
                   help="seconds a dynamic cluster waits for all its nodes (MS_TOPO_TIMEOUT, default 600)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory per device for the memory plan, e.g. 32GB (default: context.max_device_memory)")
    p.add_argument("--ignore-memory-plan", action="store_true",
                   help="start a train/finetune run even when its memory plan does not fit the device memory")
    p.add_argument("--tail", type=int, default=TAIL_LINES, metavar="N",
                   help=f"log lines shown for a failed rank (default {TAIL_LINES})")
    return p


def _split_positionals(args: List[str], errors: List[str]):
    """``(table, config, device_range, run_status, rank_size or None, predict_data)``."""
    if len(args) < 4:
        errors.append(f"expected RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS, got {len(args)} argument"
                      f"{'s' if len(args) != 1 else ''}{': ' + ' '.join(map(shlex.quote, args)) if args else ''}")
        return None
    table, config, device_range, status, *rest = args
    rank_size = None
    if rest and rest[0].isdigit():
        rank_size = int(rest[0])
        rest = rest[1:]
        if rank_size < 1:
            errors.append(f"RANK_SIZE: expected a positive integer, got {rank_size}")
    if status not in RUN_STATUSES:
        errors.append(f"RUN_STATUS: {status!r} is not one of {', '.join(RUN_STATUSES)}")
    elif status == "predict" and not rest:
        errors.append("PREDICT_DATA: predict needs texts or a data file after RUN_STATUS")
    elif status != "predict" and rest:
        errors.append(f"unexpected argument{'s' if len(rest) > 1 else ''} after RUN_STATUS {status}: "
                      f"{' '.join(map(shlex.quote, rest))} (RANK_SIZE must be a positive integer; "
                      f"texts only with predict)")
    return table, config, device_range, status, rank_size, rest


def _read_config(path: str, errors: List[str]):
    """``(raw mapping, TrainSettings)`` of the run YAML, or ``(None, None)`` with the problem in ``errors``."""
    import warnings
    from glm_common.config import ConfigError
    from glm_common.run_config import RunConfigError, load_run_config, settings_from_config
    try:
        raw = load_run_config(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unused keys: each rank lists them in its log
            settings = settings_from_config(raw, source=path, warn=False)
        return raw, settings
    except (RunConfigError, ConfigError) as e:
        errors.append(f"CONFIG_PATH: {e}")
    except Exception as e:  # a config the checker itself trips on is still the config's problem
        errors.append(f"CONFIG_PATH: {path}: {type(e).__name__}: {e}")
    return None, None


def _check_output(output: str, errors: List[str]) -> None:
    """``--output`` must be a directory, or creatable under its nearest existing ancestor."""
    from glm_common.fsutil import OutputError, check_writable_dir
    probe = output
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        errors.append(f"--output: {probe}: not a directory")
        return
    try:
        check_writable_dir(probe)
    except OutputError as e:
        errors.append(f"--output: {e}")


def _memory_plan(raw: dict, config: str, devices: int, opts, errors: List[str]) -> Optional[dict]:
    """The memory plan of the run on ``devices`` devices (:mod:`glm_common.memory_plan`), or None with the
    problem in ``errors``."""
    from glm_common.memory_plan import PlanError, fixes, layout_from_config, plan_memory
    try:
        layout = layout_from_config(raw, source=config, devices=devices, device_memory=opts.device_memory)
        memory = plan_memory(layout)
        memory["fixes"] = fixes(layout) if memory["fits"] is False else []
        return memory
    except PlanError as e:
        errors.append(f"memory plan: {e}")
    return None


def memory_refusal(memory: dict) -> List[str]:
    """The lines that refuse a plan that does not fit (what would make it fit, and the override)."""
    from glm_common.memory_plan import format_size
    lines = [f"memory plan: {format_size(memory['total_bytes'])} per device does not fit "
             f"{format_size(memory['budget_bytes'])} ({memory['budget_source']})"]
    for f in memory["fixes"]:
        lines.append(f"memory plan: it would fit with {f['change']}: {format_size(f['total_bytes'])}")
    if not memory["fixes"]:
        lines.append("memory plan: no single change of optimizer shard, recompute, model or pipeline parallel or "
                     "batch size makes it fit")
    lines.append("memory plan: python -m mindspore_glm.plan --config CONFIG_PATH shows it in full; "
                 "--ignore-memory-plan starts the run anyway")
    return lines


def build_plan(argv: Sequence[str], environ: Optional[Dict[str, str]] = None, cwd: Optional[str] = None):
    """Check the launch arguments ``argv`` and return ``(plan, options)``; raise :class:`LaunchError`
    listing every problem found. Starts nothing and writes nothing."""
    from hccl.rank_table import RankTableError, parse_device_range
    from hccl.validate import check_file, rank_plan

    environ = dict(os.environ if environ is None else environ)
    cwd = os.path.abspath(cwd or os.getcwd())
    argv = list(argv)
    run_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, run_args = argv[:i], argv[i + 1:]
    opts = _parser().parse_intermixed_args(argv)
    if opts.grace is None:
        try:
            opts.grace = float(environ.get("GLM_LAUNCH_GRACE", "10"))
        except ValueError:
            raise LaunchError(f"GLM_LAUNCH_GRACE: expected seconds, got {environ['GLM_LAUNCH_GRACE']!r}") from None
    opts.dry_run = opts.dry_run or environ.get("GLM_DRY_RUN", "").strip().lower() in ("1", "true", "yes", "on")

    errors: List[str] = []
    if opts.grace < 0:
        errors.append(f"--grace: expected seconds >= 0, got {opts.grace:g}")
    if opts.port is not None and not 1024 <= opts.port <= 65535:
        errors.append(f"--port: expected 1024..65535, got {opts.port}")
    split = _split_positionals(opts.args, errors)
    if split is None:
        raise LaunchError(errors)
    table, config, device_range, status, rank_size, predict_data = split

    rng = None
    try:
        rng = parse_device_range(device_range, "DEVICE_RANGE")
    except RankTableError as e:
        errors.extend(e.errors)

    config_abs = os.path.join(cwd, config)
    raw, settings = (None, None)
    if not os.path.isfile(config_abs):
        errors.append(f"CONFIG_PATH: {config}: no such file")
    else:
        raw, settings = _read_config(config_abs, errors)
    target = settings.device_target if settings is not None else None
    ascend = target == "Ascend"

    table_abs = None
    if table in NO_TABLE:
        if ascend:
            errors.append("RANK_TABLE_FILE: required on Ascend (context.device_target of "
                          f"{config}); make one with hccl/hccl_tools.py")
    else:
        table_abs = os.path.join(cwd, table)
        if not os.path.isfile(table_abs):
            errors.append(f"RANK_TABLE_FILE: {table}: no such file")
        else:  # with a bad range the table's own shape is still checked
            errors.extend(f"RANK_TABLE_FILE: {e}" for e in check_file(table_abs, rng, rank_size)
                          if rng is not None or "device range" not in e)

    if settings is not None and not ascend:
        if settings.parallel_mode != 0:
            errors.append(f"CONFIG_PATH: {config}: parallel.parallel_mode: {settings.parallel_mode} "
                          f"(semi-auto parallel) needs Ascend or GPU; {target} runs data parallel (0) only")
        if rng is not None and rank_size is not None and rank_size != rng[1] - rng[0] \
                and opts.launcher == "native":
            errors.append(f"RANK_SIZE: {rank_size}, but a {target} launch runs one node with the "
                          f"{rng[1] - rng[0]} ranks of DEVICE_RANGE {device_range}; multi-node: --launcher msrun")
    if opts.launcher == "msrun" and rng is not None and rank_size is not None and rng[0] % (rng[1] - rng[0]):
        errors.append(f"DEVICE_RANGE: {device_range}: msrun numbers a node's ranks node_rank x "
                      f"{rng[1] - rng[0]} + i, so the range must start at a multiple of {rng[1] - rng[0]}")
    _check_output(os.path.join(cwd, opts.output), errors)
    memory = None
    if not errors and status in ("train", "finetune"):
        memory = _memory_plan(raw, config, rank_size or (rng[1] - rng[0]), opts, errors)
    if errors:
        raise LaunchError(errors)

    output = os.path.join(cwd, opts.output)
    work = os.path.join(output, "work")
    logs = os.path.join(output, "log")
    plan = Plan(mode="msrun" if opts.launcher == "msrun" else ("ascend" if ascend else "cluster"),
                device_target=target, run_status=status, config=config_abs,
                run_config=os.path.join(work, "run_config.yaml"), resolved=resolve_paths(raw, cwd),
                table=table_abs, rank_size=rank_size or (rng[1] - rng[0]), output=output, memory=memory)
    table_data = None
    if table_abs:  # each rank's DEVICE_ID is the one its entry of the (checked) table names
        from hccl.rank_table import load_table
        table_data = load_table(table_abs)
    pairs = rank_plan(rng, rank_size, table_data)

    python = sys.executable or "python3"
    worker_cmd = shlex.split(environ["GLM_LAUNCH_WORKER"]) if environ.get("GLM_LAUNCH_WORKER") \
        else [python, "-m", "mindspore_glm.run"]
    run_cmd = ["--config", plan.run_config, "--use_parallel", "True", "--run_mode", status]
    if predict_data:
        run_cmd += ["--predict_data", *predict_data]
    run_cmd += run_args
    pythonpath = os.pathsep.join(x for x in (ROOT, environ.get("PYTHONPATH", "")) if x)
    base = {"PYTHONPATH": pythonpath, "RANK_SIZE": str(plan.rank_size)}
    if table_abs:
        base["RANK_TABLE_FILE"] = table_abs

    if plan.mode == "msrun":
        local = rng[1] - rng[0]
        plan.port = opts.port or free_port()
        node_rank = 0 if rank_size is None else rng[0] // local
        env = dict(base)
        env["PATH"] = os.pathsep.join([os.path.dirname(python), environ.get("PATH", "")])
        if ascend:  # msrun's worker i gets DEVICE_ID=i, an index into these: rank start+i on its table device
            env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(d) for _, d in pairs)
        msrun = [python, "-m", "mindspore.parallel.cluster.run",
                 "--worker_num", str(plan.rank_size), "--local_worker_num", str(local),
                 "--master_addr", opts.master_addr, "--master_port", str(plan.port), "--node_rank", str(node_rank),
                 "--log_dir", os.path.join(logs, "msrun"), "--join", "True",
                 "--cluster_time_out", str(opts.cluster_timeout)]
        if table_abs:
            msrun += ["--rank_table_file", table_abs]
        # msrun runs 'python' found on PATH (this interpreter's bin first) or a script path
        task = worker_cmd
        if os.path.basename(task[0]).startswith("python"):
            task = ["python"] + task[1:]
        plan.procs.append(Proc("msrun", msrun + task + run_cmd, env, os.path.join(work, "msrun"),
                               os.path.join(logs, "msrun", "msrun.log")))
        return plan, opts

    if plan.mode == "cluster":
        plan.port = opts.port or free_port()
        cluster = {"MS_SCHED_HOST": "127.0.0.1", "MS_SCHED_PORT": str(plan.port),
                   "MS_WORKER_NUM": str(len(pairs)), "MS_TOPO_TIMEOUT": str(opts.cluster_timeout)}
        sched_cmd = shlex.split(environ["GLM_LAUNCH_SCHEDULER"]) if environ.get("GLM_LAUNCH_SCHEDULER") \
            else [python, "-m", "mindspore_glm.launch", "--scheduler", plan.device_target]
        plan.procs.append(Proc("scheduler", sched_cmd, {**base, **cluster, "MS_ROLE": "MS_SCHED", "RANK_ID": "0"},
                               os.path.join(work, "scheduler"), os.path.join(logs, "scheduler", "scheduler.log"),
                               is_worker=False))
    for rank_id, device_id in pairs:
        env = {**base, "RANK_ID": str(rank_id), "DEVICE_ID": str(device_id)}
        if plan.mode == "cluster":
            env.update(cluster, MS_ROLE="MS_WORKER", MS_NODE_ID=str(rank_id))
        cmd = worker_cmd + run_cmd[:6] + ["--device_id", str(device_id)] + run_cmd[6:]
        plan.procs.append(Proc(f"rank {rank_id}", cmd, env, os.path.join(work, f"rank_{rank_id}"),
                               os.path.join(logs, f"rank_{rank_id}", "worker.log"), rank=rank_id,
                               device_id=device_id))
    plan.lock_dir = _lock_dir(plan, run_args)
    return plan, opts


def _lock_dir(plan: Plan, run_args: List[str]) -> Optional[str]:
    """The output_dir of a train/finetune run whose lock (:mod:`glm_common.run_lock`) the launcher takes
    for all its ranks: the node that starts global rank 0 takes it; None elsewhere. The ranks' value:
    ``-- --output_dir`` over the YAML's ``output_dir`` (default ``./output``), relative to rank 0's
    working directory."""
    if plan.run_status not in ("train", "finetune"):
        return None
    first = next((p for p in plan.procs if p.rank == 0), None)
    if first is None:
        first = next((p for p in plan.procs if p.name == "msrun"), None)
        if first is None or "--node_rank" not in first.cmd or first.cmd[first.cmd.index("--node_rank") + 1] != "0":
            return None
    out = plan.resolved.get("output_dir") if isinstance(plan.resolved, dict) else None
    for i, a in enumerate(run_args):
        if a == "--output_dir" and i + 1 < len(run_args):
            out = run_args[i + 1]
        elif a.startswith("--output_dir="):
            out = a.split("=", 1)[1]
    out = out if isinstance(out, str) and out and out not in ("None", "null") else "./output"
    return os.path.normpath(os.path.join(first.cwd, os.path.expanduser(out)))


def format_plan(plan: Plan, dry_run: bool = False) -> str:
    """The plan as text: one block per process (its variables, working directory, log and command)."""
    how = {"ascend": "rank table (Ascend)",
           "cluster": f"MindSpore dynamic cluster on 127.0.0.1:{plan.port} ({plan.device_target})",
           "msrun": f"msrun, scheduler port {plan.port} ({plan.device_target})"}[plan.mode]
    workers = [p for p in plan.procs if p.rank is not None]
    n = len(workers) if plan.mode != "msrun" else plan.rank_size
    lines = [f"run_distribute: {'dry run, nothing started: ' if dry_run else ''}{plan.run_status} on "
             f"{n} rank{'s' if n != 1 else ''} of {plan.rank_size}, {how}",
             f"  config: {plan.config}",
             f"  ranks read: {plan.run_config} (relative paths resolved)",
             f"  rank table: {plan.table or 'none'}"]
    if plan.lock_dir is not None:
        from glm_common.run_lock import lock_path
        lines.append(f"  output_dir: {plan.lock_dir} (locked for the run: {lock_path(plan.lock_dir)})")
    if plan.memory is not None:
        from glm_common.memory_plan import plan_line
        lines.append(f"  {plan_line(plan.memory)}")
    for p in plan.procs:
        head = p.name if p.device_id is None else f"{p.name} (device {p.device_id})"
        lines.append(f"  {head}")
        lines.append("    env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in p.env.items()
                                            if k not in ("PYTHONPATH", "PATH")))
        lines.append(f"    cwd: {p.cwd}")
        lines.append(f"    log: {p.log}")
        lines.append("    cmd: " + " ".join(shlex.quote(c) for c in p.cmd))
    return "\n".join(lines)


def write_run_config(plan: Plan) -> None:
    import yaml
    os.makedirs(os.path.dirname(plan.run_config), exist_ok=True)
    from glm_common.fsutil import atomic_file
    with atomic_file(plan.run_config, "w", encoding="utf-8") as f:
        f.write(f"# written by run_distribute.sh from {plan.config}; relative paths resolved\n")
        yaml.safe_dump(plan.resolved, f, allow_unicode=True, sort_keys=False)
