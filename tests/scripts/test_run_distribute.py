"""scripts/run_distribute.sh: its plan (mindspore_glm/launch_plan.py) and supervisor (glm_common/supervisor.py).

Supervision is tested with a stand-in worker (tests/scripts/fake_worker.py, via GLM_LAUNCH_WORKER), so
those tests need no MindSpore (the ones marked ``faults`` are the launcher's process faults of the fault
matrix, tests/faults/); the slow test runs a real 2-rank data-parallel LoRA fine-tune on CPU
and checks it against a single-process run over the same global batches.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from hccl.rank_table import new_device, new_server, new_table
from mindspore_glm.launch import LaunchError, build_plan, resolve_paths
from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL, TOKENIZER_MODEL

SCRIPT = os.path.join(ROOT, "scripts", "run_distribute.sh")
TINY_LORA = os.path.join(ROOT, "configs", "tiny", "run_tiny_lora.yaml")
GLM2_LORA = os.path.join(ROOT, "configs", "glm2", "run_glm2_6b_lora.yaml")
FAKE = f"{sys.executable} -m tests.scripts.fake_worker"


def _launch(args, cwd, env=None, timeout=60):
    e = dict(os.environ)
    e.pop("GLM_DRY_RUN", None)
    e.update({"PYTHON": sys.executable, **(env or {})})
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def _unfinished(log_dir, *ranks):
    """True when none of ``ranks`` (stand-ins told to run 60 s) reached its end: they were stopped, not
    waited for. Decided by what they wrote, never by how long the launch took."""
    return all(f"rank_{r} done" not in (log_dir / f"rank_{r}" / "worker.log").read_text() for r in ranks)


def _fake_env(out, **extra):
    out.mkdir(exist_ok=True)
    return {"GLM_LAUNCH_WORKER": FAKE, "GLM_LAUNCH_SCHEDULER": FAKE + " --scheduler", "FAKE_OUT": str(out),
            **{k: str(v) for k, v in extra.items()}}


def _table(path, n=8, servers=1, devices=None):
    """A version 1.0 rank table: ``servers`` x ``n`` devices (ids ``devices``, default 0..n-1), ranks in order."""
    devices = list(range(n)) if devices is None else list(devices)
    srv = [new_server(f"10.0.0.{s + 1}", [new_device(dev, f"192.{d + 1}.{27 + s}.6", s * n + d)
                                          for d, dev in enumerate(devices)])
           for s in range(servers)]
    path.write_text(json.dumps(new_table(srv), indent=2))
    return str(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _errors(args, cwd, **env):
    with pytest.raises(LaunchError) as e:
        build_plan(args, environ={"PATH": os.environ.get("PATH", ""), **env}, cwd=str(cwd))
    return e.value.errors


# ------------------------------------------------------------------------------------------- arguments
def test_help_lists_arguments_and_options(tmp_path):
    r = _launch(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ("RANK_TABLE_FILE", "CONFIG_PATH", "DEVICE_RANGE", "RUN_STATUS", "RANK_SIZE", "PREDICT_DATA",
                 "--dry-run", "GLM_DRY_RUN", "--launcher", "log/rank_N/worker.log", "work/rank_N"):
        assert word in r.stdout, word
    assert not (tmp_path / "output").exists()


def test_too_few_arguments(tmp_path):
    r = _launch([TINY_LORA, "[0,2)"], tmp_path)
    assert r.returncode == 2
    assert "expected RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS, got 2" in r.stderr
    assert "Usage:" in r.stderr


def test_bad_arguments_are_all_reported_before_anything_starts(tmp_path):
    r = _launch(["-", TINY_LORA, "[2,2)", "finetun", "0"], tmp_path, env=_fake_env(tmp_path / "fake"))
    assert r.returncode == 2
    err = r.stderr
    assert "RANK_SIZE: expected a positive integer, got 0" in err
    assert "RUN_STATUS: 'finetun' is not one of train, finetune, eval, predict" in err
    assert "DEVICE_RANGE: '[2,2)' is empty" in err
    assert not (tmp_path / "output").exists() and not list((tmp_path / "fake").iterdir())


def test_validation_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  model_config: [1, 2\n")
    bad_key = tmp_path / "bad_key.yaml"
    cfg = yaml.safe_load(open(TINY_LORA))
    cfg["runner_config"]["epochs"] = "many"
    bad_key.write_text(yaml.safe_dump(cfg))
    semi = tmp_path / "semi.yaml"
    cfg = yaml.safe_load(open(TINY_LORA))
    cfg["parallel"]["parallel_mode"] = 1
    semi.write_text(yaml.safe_dump(cfg))
    t8 = _table(tmp_path / "t8.json", 8)
    t16 = _table(tmp_path / "t16.json", 8, servers=2)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"version": "1.0", "server_count": "1", "server_list": [], "status": "completed"}))

    cases = [
        (["-", "nope.yaml", "[0,2)", "finetune"], "CONFIG_PATH: nope.yaml: no such file"),
        (["-", str(bad_yaml), "[0,2)", "finetune"], f"CONFIG_PATH: {bad_yaml}:3: not valid YAML"),
        (["-", str(bad_key), "[0,2)", "finetune"], "runner_config.epochs"),
        (["-", str(semi), "[0,2)", "finetune"], "parallel.parallel_mode: 1 (semi-auto parallel) needs Ascend or GPU"),
        (["-", TINY_LORA, "[0,2)", "finetune", "4"], "RANK_SIZE: 4, but a CPU launch runs one node with the 2 ranks"),
        (["-", TINY_LORA, "0-2", "finetune"], "DEVICE_RANGE: '0-2' is not a range like"),
        (["-", TINY_LORA, "[0,2)", "predict"], "PREDICT_DATA: predict needs texts or a data file"),
        (["-", TINY_LORA, "[0,2)", "finetune", "hello"], "unexpected argument after RUN_STATUS finetune: hello"),
        (["-", GLM2_LORA, "[0,8)", "finetune"], "RANK_TABLE_FILE: required on Ascend"),
        (["missing.json", GLM2_LORA, "[0,8)", "finetune"], "RANK_TABLE_FILE: missing.json: no such file"),
        ([t8, GLM2_LORA, "[0,4)", "finetune"], "device range [0,4) starts 4 ranks, but the table lists 8 devices"),
        ([t16, GLM2_LORA, "[0,8)", "finetune"], "pass RANK_SIZE (16) for a multi-node table"),
        ([t16, GLM2_LORA, "[8,16)", "finetune", "8"], "RANK_SIZE 8 does not match the table's 16 devices"),
        ([t16, GLM2_LORA, "[4,12)", "finetune", "16"], "one node's ranks must be on one server"),
        ([str(broken), GLM2_LORA, "[0,8)", "finetune"], "server_list: empty"),
        (["-", TINY_LORA, "[0,2)", "finetune", "--grace", "-1"], "--grace: expected seconds >= 0"),
    ]
    for args, expected in cases:
        errors = _errors(args, tmp_path)
        assert any(expected in e for e in errors), (args, errors)
    assert not (tmp_path / "output").exists()


# ------------------------------------------------------------------------------------------- dry run
def test_dry_run_cpu_cluster(tmp_path):
    r = _launch(["-", TINY_LORA, "[0,2]", "finetune", "--", "--train_steps", "4"], tmp_path,
                env={"GLM_DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "dry run, nothing started: finetune on 2 ranks of 2, MindSpore dynamic cluster on 127.0.0.1:" in out
    blocks = re.split(r"\n  (?=\S)", out)
    sched = next(b for b in blocks if b.startswith("scheduler"))
    assert "MS_ROLE=MS_SCHED" in sched and "MS_SCHED_HOST=127.0.0.1" in sched and "MS_WORKER_NUM=2" in sched
    port = sched.split("MS_SCHED_PORT=")[1].split()[0]
    for rank in (0, 1):
        b = next(b for b in blocks if b.startswith(f"rank {rank} (device {rank})"))
        for var in (f"RANK_ID={rank}", f"DEVICE_ID={rank}", "RANK_SIZE=2", "MS_ROLE=MS_WORKER", f"MS_NODE_ID={rank}",
                    f"MS_SCHED_PORT={port}", "MS_SCHED_HOST=127.0.0.1", "MS_WORKER_NUM=2"):
            assert var in b, (var, b)
        assert "RANK_TABLE_FILE" not in b
        assert f"cwd: {tmp_path}/output/work/rank_{rank}" in b
        assert f"log: {tmp_path}/output/log/rank_{rank}/worker.log" in b
        assert (f"-m mindspore_glm.run --config {tmp_path}/output/work/run_config.yaml --use_parallel True "
                f"--run_mode finetune --device_id {rank} --train_steps 4") in b
    assert not (tmp_path / "output").exists()


def test_dry_run_ascend_single_and_multi_node(tmp_path):
    t8 = _table(tmp_path / "hccl_8p.json", 8)
    r = _launch(["--dry-run", t8, GLM2_LORA, "[0,8]", "finetune"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "finetune on 8 ranks of 8, rank table (Ascend)" in r.stdout
    assert "MS_ROLE" not in r.stdout and "scheduler" not in r.stdout
    for i in range(8):
        assert f"rank {i} (device {i})\n    env: RANK_SIZE=8 RANK_TABLE_FILE={t8} RANK_ID={i} DEVICE_ID={i}\n" in r.stdout

    t16 = _table(tmp_path / "cluster_16p.json", 8, servers=2)
    r = _launch(["--dry-run", t16, GLM2_LORA, "[8,16]", "finetune", "16"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "finetune on 8 ranks of 16" in r.stdout
    for rank in range(8, 16):
        assert f"rank {rank} (device {rank - 8})\n    env: RANK_SIZE=16 RANK_TABLE_FILE={t16} RANK_ID={rank} " \
               f"DEVICE_ID={rank - 8}\n" in r.stdout
        assert f"--device_id {rank - 8}" in r.stdout


def test_each_rank_binds_the_device_its_table_entry_names(tmp_path):
    """The table, not the range's order, gives DEVICE_ID; a table naming other devices than the range is
    refused before anything starts."""
    t = _table(tmp_path / "hccl_2p.json", 2, devices=(3, 2))
    r = _launch(["--dry-run", t, GLM2_LORA, "[2,4)", "finetune"], tmp_path)
    assert r.returncode == 0, r.stderr
    for rank, dev in ((0, 3), (1, 2)):
        assert f"rank {rank} (device {dev})\n    env: RANK_SIZE=2 RANK_TABLE_FILE={t} RANK_ID={rank} " \
               f"DEVICE_ID={dev}\n" in r.stdout
        assert f"--device_id {dev}" in r.stdout.split(f"rank {rank} (device")[1].split("cmd:")[1].splitlines()[0]
    t23 = _table(tmp_path / "hccl_23.json", 2, devices=(2, 3))
    r = _launch(["--dry-run", t23, GLM2_LORA, "[0,2)", "finetune"], tmp_path)
    assert r.returncode == 2 and "the table names devices 2, 3, but device range [0,2) is devices 0, 1" in r.stderr
    t9 = _table(tmp_path / "hccl_9.json", 2, devices=(0, 9))
    r = _launch(["--dry-run", t9, GLM2_LORA, "[0,2)", "finetune"], tmp_path)
    assert r.returncode == 2 and "device 9 does not exist on a node of" in r.stderr


def test_msrun_ranks_take_the_launchers_device_not_the_yamls(tmp_path):
    """Under msrun (a dynamic cluster) the device of a rank comes from the launcher: the table's devices are
    made visible in rank order, msrun's worker i gets DEVICE_ID=i, and the rank uses it, not the YAML's
    context.device_id (mindformers drops it there)."""
    from mindspore_glm.launch_plan import launcher_device_id
    cfg = yaml.safe_load(open(GLM2_LORA))
    cfg["context"]["device_id"] = 0
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    t = _table(tmp_path / "hccl_4p.json", 4, devices=(5, 4, 7, 6))
    plan, _ = build_plan(["--launcher", "msrun", t, str(tmp_path / "run.yaml"), "[4,8)", "finetune"],
                         environ={"PATH": os.environ.get("PATH", "")}, cwd=str(tmp_path))
    (msrun,) = plan.procs
    assert msrun.env["ASCEND_RT_VISIBLE_DEVICES"] == "5,4,7,6"
    assert "--device_id" not in msrun.cmd
    assert launcher_device_id({"MS_ROLE": "MS_WORKER", "DEVICE_ID": "2", "RANK_ID": "2"}) == 2  # device 7
    assert launcher_device_id({"DEVICE_ID": "2"}) is None          # rank-table launch: --device_id decides


def test_msrun_rank_ignores_the_yaml_device_id(tmp_path, monkeypatch):
    """mindspore_glm.run under msrun: the launcher's DEVICE_ID reaches set_context, the YAML's 0 does not."""
    import mindspore_glm.run as run
    seen = {}

    def stop(s, *a, **k):
        seen["device_id"] = s.device_id
        raise SystemExit(0)
    monkeypatch.setattr(run, "set_context", stop)
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("DEVICE_ID", "3")
    with pytest.raises(SystemExit):
        run.main(["--config", TINY_LORA, "--run_mode", "predict", "--predict_data", "x"])
    assert seen["device_id"] == 3
    monkeypatch.delenv("MS_ROLE")
    with pytest.raises(SystemExit):
        run.main(["--config", TINY_LORA, "--run_mode", "predict", "--predict_data", "x"])
    assert seen["device_id"] == 0


def test_dry_run_predict_and_msrun(tmp_path):
    r = _launch(["--dry-run", "--launcher", "msrun", "-", TINY_LORA, "[0,2)", "predict", "类型#裙", "你好"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "msrun, scheduler port" in r.stdout
    cmd = r.stdout.split("cmd: ")[1]
    assert "-m mindspore.parallel.cluster.run --worker_num 2 --local_worker_num 2 --master_addr 127.0.0.1" in cmd
    assert "--node_rank 0" in cmd and "--join True" in cmd and f"--log_dir {tmp_path}/output/log/msrun" in cmd
    assert "python -m mindspore_glm.run --config" in cmd
    assert "--run_mode predict --predict_data '类型#裙' '你好'" in cmd


def test_resolve_paths_makes_relative_paths_absolute():
    cfg = {"output_dir": "./output", "load_checkpoint": "ckpt/x", "seed": 0, "context": {"device_target": "CPU"},
           "train_dataset": {"data_loader": {"dataset_dir": "/abs/train.json", "type": "ADGenDataLoader"},
                             "tokenizer": {"vocab_file": "tok.model"}},
           "callbacks": [{"type": "X", "prefix": "p"}], "parallel": {"strategy_ckpt_save_file": "./s.ckpt"},
           "remote_path": "s3://bucket/x", "pet": {"some_dir": ""}}
    out = resolve_paths(cfg, "/launch")
    assert out["output_dir"] == "/launch/output" and out["load_checkpoint"] == "/launch/ckpt/x"
    assert out["train_dataset"]["data_loader"] == {"dataset_dir": "/abs/train.json", "type": "ADGenDataLoader"}
    assert out["train_dataset"]["tokenizer"]["vocab_file"] == "/launch/tok.model"
    assert out["parallel"]["strategy_ckpt_save_file"] == "/launch/s.ckpt"
    assert out["remote_path"] == "s3://bucket/x" and out["pet"] == {"some_dir": ""} and out["callbacks"] == cfg["callbacks"]


# ------------------------------------------------------------------------------------------- supervision
def test_all_ranks_succeed_with_their_variables(tmp_path):
    fake = tmp_path / "fake"
    r = _launch(["-", TINY_LORA, "[0,2)", "finetune"], tmp_path, env=_fake_env(fake))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 2 ranks succeeded" in r.stdout
    sched = json.loads((fake / "scheduler.json").read_text())
    assert sched["env"]["MS_ROLE"] == "MS_SCHED"
    for rank in (0, 1):
        info = json.loads((fake / f"rank_{rank}.json").read_text())
        env = info["env"]
        assert env["RANK_ID"] == str(rank) and env["DEVICE_ID"] == str(rank) and env["RANK_SIZE"] == "2"
        assert env["MS_ROLE"] == "MS_WORKER" and env["MS_NODE_ID"] == str(rank) and env["MS_WORKER_NUM"] == "2"
        assert env["MS_SCHED_HOST"] == "127.0.0.1" and env["MS_SCHED_PORT"] == sched["env"]["MS_SCHED_PORT"]
        assert info["cwd"] == str(tmp_path / "output" / "work" / f"rank_{rank}")
        assert info["pgid"] == info["pid"]  # a process group of its own
        assert info["argv"][:6] == ["--config", str(tmp_path / "output" / "work" / "run_config.yaml"),
                                    "--use_parallel", "True", "--run_mode", "finetune"]
        log = (tmp_path / "output" / "log" / f"rank_{rank}" / "worker.log").read_text()
        assert f"rank_{rank} up" in log and f"rank_{rank} done" in log
    # the YAML the ranks read: the given one, relative paths resolved against the launch directory
    run_cfg = yaml.safe_load((tmp_path / "output" / "work" / "run_config.yaml").read_text())
    assert run_cfg["train_dataset"]["data_loader"]["dataset_dir"] == str(tmp_path / "tests/fixtures/data/adgen/train.json")
    assert run_cfg["output_dir"] == str(tmp_path / "output")
    assert run_cfg["model"] == yaml.safe_load(open(TINY_LORA))["model"]


def test_ascend_launch_exports_the_rank_table(tmp_path):
    fake = tmp_path / "fake"
    t4 = _table(tmp_path / "hccl_4p.json", 4, devices=range(4, 8))
    r = _launch([t4, GLM2_LORA, "[4,8)", "finetune"], tmp_path, env=_fake_env(fake))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (fake / "scheduler.json").exists()
    for rank in range(4):
        env = json.loads((fake / f"rank_{rank}.json").read_text())["env"]
        assert env["RANK_TABLE_FILE"] == t4 and env["RANK_SIZE"] == "4"
        assert env["RANK_ID"] == str(rank) and env["DEVICE_ID"] == str(rank + 4)
        assert "MS_ROLE" not in env


@pytest.mark.faults
def test_a_crashing_rank_stops_the_others(tmp_path):
    fake = tmp_path / "fake"
    env = _fake_env(fake, FAKE_SECONDS=60, FAKE_CRASH_RANK=1, FAKE_CRASH_AFTER=1.5, FAKE_CHILD=1,
                    FAKE_SCHED_SECONDS=60)
    r = _launch(["--grace", "5", "-", TINY_LORA, "[0,3)", "finetune"], tmp_path, env=env)
    assert r.returncode == 1
    assert _unfinished(tmp_path / "output" / "log", 0, 2)  # rank 0 and 2 would run 60 s
    err = r.stderr
    assert "rank 1 failed (exit code 3)" in err and "stopping" in err
    assert f"{tmp_path}/output/log/rank_1/worker.log; its last 30 lines:" in err
    assert "  | boom: injected failure" in err and "  | step 21 fine" in err and "  | step 20 fine" not in err
    for role in ("rank_0", "rank_2", "scheduler"):
        info = json.loads((fake / f"{role}.json").read_text())
        assert not _alive(info["pid"]), role
        if "child" in info:
            assert not _alive(info["child"]), role + " child"


@pytest.mark.faults
def test_a_rank_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    fake = tmp_path / "fake"
    env = _fake_env(fake, FAKE_SECONDS=60, FAKE_CRASH_RANK=0, FAKE_CRASH_AFTER=1, FAKE_IGNORE_TERM=1)
    r = _launch(["--grace", "1", "-", TINY_LORA, "[0,2)", "finetune"], tmp_path, env=env)
    assert r.returncode == 1, r.stderr
    assert _unfinished(tmp_path / "output" / "log", 1)
    assert "rank 0 failed (exit code 3)" in r.stderr
    assert "rank 1 did not stop within 1 s of SIGTERM; SIGKILL" in r.stderr
    assert not _alive(json.loads((fake / "rank_1.json").read_text())["pid"])


@pytest.mark.faults
def test_a_failing_scheduler_stops_the_ranks(tmp_path):
    fake = tmp_path / "fake"
    env = _fake_env(fake, FAKE_SECONDS=60, FAKE_SCHED_SECONDS=1, FAKE_SCHED_CODE=1)
    r = _launch(["-", TINY_LORA, "[0,2)", "finetune"], tmp_path, env=env)
    assert r.returncode == 1, r.stderr
    assert "scheduler failed (exit code 1)" in r.stderr
    assert _unfinished(tmp_path / "output" / "log", 0, 1)


@pytest.mark.faults
def test_msrun_launch_names_the_failed_rank_and_stops_the_rest(tmp_path):
    fake = tmp_path / "fake"
    env = _fake_env(fake, FAKE_SECONDS=60, FAKE_CRASH_RANK=1, FAKE_CRASH_AFTER=1.5, FAKE_SCHED_SECONDS=60)
    env["GLM_LAUNCH_WORKER"] = "python -m tests.scripts.fake_worker"
    r = _launch(["--launcher", "msrun", "-", TINY_LORA, "[0,2)", "finetune"], tmp_path, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rank 1 failed (exit code 3)" in r.stderr and "stopping msrun" in r.stderr
    # msrun alone would wait for its scheduler and rank 0 (60 s here): both were stopped
    assert "rank_0 done" not in (tmp_path / "output" / "log" / "msrun" / "worker_0.log").read_text()
    assert f"{tmp_path}/output/log/msrun/worker_1.log; its last 30 lines:" in r.stderr
    assert "  | boom: injected failure" in r.stderr
    for role in ("rank_0", "rank_1", "scheduler"):
        info = json.loads((fake / f"{role}.json").read_text())
        assert not _alive(info["pid"]), role
    assert json.loads((fake / "rank_1.json").read_text())["env"]["MS_NODE_ID"] == "1"


@pytest.mark.faults
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_all_ranks(tmp_path, sig):
    fake = tmp_path / "fake"
    env = dict(os.environ, PYTHON=sys.executable, **_fake_env(fake, FAKE_SECONDS=60, FAKE_SCHED_SECONDS=60))
    env.pop("GLM_DRY_RUN", None)
    p = subprocess.Popen(["bash", SCRIPT, "-", TINY_LORA, "[0,2)", "finetune"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while not all((fake / f"{r}.json").exists() for r in ("rank_0", "rank_1", "scheduler")):
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(sig)
    out, err = p.communicate(timeout=50)         # a hang guard: the stand-ins would run 60 s
    assert _unfinished(tmp_path / "output" / "log", 0, 1)
    assert p.returncode == 128 + sig, err
    assert f"{signal.Signals(sig).name} received; stopping scheduler, rank 0, rank 1" in err
    for role in ("rank_0", "rank_1", "scheduler"):
        assert not _alive(json.loads((fake / f"{role}.json").read_text())["pid"]), role


def test_one_output_dir_lock_for_the_whole_launch(tmp_path):
    """The launcher holds the output_dir lock for its ranks (its token in their environment, so they do not
    refuse each other); a second launch on the same output_dir is refused in one line naming the first."""
    fake = tmp_path / "fake"
    env = dict(os.environ, PYTHON=sys.executable, **_fake_env(fake, FAKE_SECONDS=60, FAKE_SCHED_SECONDS=60))
    env.pop("GLM_DRY_RUN", None)
    p = subprocess.Popen(["bash", SCRIPT, "-", TINY_LORA, "[0,2)", "finetune"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not all((fake / f"{r}.json").exists() for r in ("rank_0", "rank_1")):
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.05)
        lock = json.loads((tmp_path / "output" / ".glm2_run.lock").read_text())
        assert lock["pid"] == p.pid
        for rank in (0, 1):
            assert json.loads((fake / f"rank_{rank}.json").read_text())["env"]["GLM_OUTPUT_LOCK_TOKEN"] == lock["token"]
        r = _launch(["-", TINY_LORA, "[0,2)", "finetune", "--output", "other"], tmp_path, env=_fake_env(tmp_path / "f2"))
        assert r.returncode == 2
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and f"in use by another run (pid {p.pid} on host" in err[0], r.stderr
        assert not (tmp_path / "f2" / "rank_0.json").exists()
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    assert not (tmp_path / "output" / ".glm2_run.lock").exists()   # released when the launch ends
    r = _launch(["--dry-run", "-", TINY_LORA, "[0,2)", "finetune", "--", "--output_dir", "elsewhere"], tmp_path)
    assert f"output_dir: {tmp_path}/output/work/rank_0/elsewhere (locked for the run" in r.stdout


# ------------------------------------------------------------------------------------------- memory plan
GLM2_FT = os.path.join(ROOT, "configs", "glm2", "run_glm2_6b_finetune.yaml")


def test_the_memory_plan_line_comes_before_the_ranks(tmp_path):
    r = _launch(["--dry-run", "-", TINY_LORA, "[0,2)", "finetune"], tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "memory plan:" in x)
    assert "per device (no device memory given" in line and "[lora, 2 devices = dp 2 x mp 1 x pp 1" in line
    assert r.stdout.index("memory plan:") < r.stdout.index("  scheduler")
    t8 = _table(tmp_path / "hccl_8p.json", 8)
    r = _launch(["--dry-run", t8, GLM2_LORA, "[0,8)", "finetune"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "of 30.00 GiB (context.max_device_memory): fits [lora, 8 devices = dp 8" in r.stdout
    r = _launch(["--dry-run", t8, GLM2_LORA, "[0,8)", "predict", "hi"], tmp_path)  # no training: no plan
    assert r.returncode == 0 and "memory plan" not in r.stdout


def test_a_plan_that_does_not_fit_is_refused_with_the_fix(tmp_path):
    t8 = _table(tmp_path / "hccl_8p.json", 8)
    fake = tmp_path / "fake"
    cfg = yaml.safe_load(open(GLM2_FT))
    cfg["parallel"]["parallel_mode"] = 0        # data parallel: MindSpore shards no optimizer state there
    dp = tmp_path / "run_glm2_6b_finetune_dp.yaml"
    dp.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    for args in (["--dry-run"], []):
        r = _launch([*args, t8, str(dp), "[0,8)", "finetune"], tmp_path, env=_fake_env(fake))
        assert r.returncode == 2, r.stdout + r.stderr
        assert "does NOT fit [full, 8 devices = dp 8 x mp 1 x pp 1, optimizer shard" in r.stdout
        assert "run_distribute: error: memory plan: " in r.stderr and "does not fit 30.00 GiB" in r.stderr
        assert "it would fit with optimizer shard (parallel.enable_parallel_optimizer: True with " \
               "parallel.parallel_mode: 1)" in r.stderr
        assert "--ignore-memory-plan" in r.stderr
        assert not list(fake.iterdir()) and not (tmp_path / "output").exists()
    r = _launch(["--dry-run", "--device-memory", "64GB", t8, GLM2_FT, "[0,8)", "finetune"], tmp_path)
    assert r.returncode == 0 and "of 64.00 GiB (--device-memory): fits" in r.stdout


def test_ignore_memory_plan_starts_the_run(tmp_path):
    cfg = yaml.safe_load(open(TINY_LORA))
    cfg["context"]["max_device_memory"] = "0.001GB"
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    fake = tmp_path / "fake"
    r = _launch(["-", str(small), "[0,2)", "finetune"], tmp_path, env=_fake_env(fake))
    assert r.returncode == 2 and "does not fit 0.00 GiB (context.max_device_memory)" in r.stderr
    assert "it would fit with" not in r.stderr and "no single change" in r.stderr
    assert not list(fake.iterdir())
    r = _launch(["--ignore-memory-plan", "-", str(small), "[0,2)", "finetune"], tmp_path, env=_fake_env(fake))
    assert r.returncode == 0, r.stderr
    assert "--ignore-memory-plan: starting although the memory plan does not fit" in r.stderr
    assert "all 2 ranks succeeded" in r.stdout and (fake / "rank_1.json").exists()


# ------------------------------------------------------------------------------------------- kill -9
def _start(args, cwd, env):
    e = dict(os.environ, PYTHON=sys.executable, **env)
    e.pop("GLM_DRY_RUN", None)
    return subprocess.Popen(["bash", SCRIPT, *args], cwd=cwd, env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _tree(pid):
    """The launcher's descendants now: ``(pids, the reaper's pid, the launch token)``."""
    import psutil
    kids = psutil.Process(pid).children(recursive=True)
    reaper = [k.pid for k in kids if "--reap" in k.cmdline()]
    token = next(k.environ()["GLM_LAUNCH_ID"] for k in kids if "GLM_LAUNCH_ID" in k.environ())
    return [k.pid for k in kids], reaper, token


def _kill_9_and_check(p, pids, reaper, token):
    from glm_common.supervisor import _launch_pids
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    deadline = time.monotonic() + 60             # a bound on the wait (the reaper sweeps within seconds)
    while any(_alive(x) for x in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if _alive(pid)]
    assert not survivors, [open(f"/proc/{x}/cmdline").read().replace("\0", " ") for x in survivors]
    assert not _launch_pids(token)
    assert reaper and not any(_alive(x) for x in reaper)  # the reaper swept and left


@pytest.mark.faults
@pytest.mark.parametrize("mode", ["cluster", "rank_table", "msrun"])
def test_kill_9_of_the_launcher_leaves_no_rank_running(tmp_path, mode):
    """The supervisor killed with SIGKILL (nothing to catch): after 5 s no scheduler, rank, rank's own
    child or msrun worker of the launch is left (parent-death signal + the reaper)."""
    fake = tmp_path / "fake"
    env = _fake_env(fake, FAKE_SECONDS=120, FAKE_SCHED_SECONDS=120, FAKE_CHILD=1)
    roles = ["rank_0", "rank_1", "scheduler"]
    if mode == "cluster":
        args = ["-", TINY_LORA, "[0,2)", "finetune"]
    elif mode == "rank_table":
        args = [_table(tmp_path / "hccl_2p.json", 2), GLM2_LORA, "[0,2)", "finetune"]
        roles = roles[:2]
    else:
        env["GLM_LAUNCH_WORKER"] = "python -m tests.scripts.fake_worker"
        args = ["--launcher", "msrun", "-", TINY_LORA, "[0,2)", "finetune"]
    p = _start(args, tmp_path, env)
    try:
        deadline = time.monotonic() + 60
        while not all((fake / f"{r}.json").exists() for r in roles):
            assert time.monotonic() < deadline and p.poll() is None, p.poll()
            time.sleep(0.05)
        pids, reaper, token = _tree(p.pid)
        infos = [json.loads((fake / f"{r}.json").read_text()) for r in roles]
        for info in infos:
            assert info["pid"] in pids and ("child" not in info or info["child"] in pids)
        _kill_9_and_check(p, pids, reaper, token)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------- real run
def _tiny_dp_config(path, batch_size, output_dir):
    """configs/tiny/run_tiny_lora.yaml with absolute paths, LoRA dropout 0, 32+32 tokens (every ADGEN
    sample then has the same number of label tokens, so the mean of per-rank mean losses is the loss
    over the global batch) and the gradient mean over ranks."""
    cfg = yaml.safe_load(open(TINY_LORA))
    cfg["load_checkpoint"] = str(TINY_MODEL)
    cfg["output_dir"] = str(output_dir)
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0
    cfg["processor"]["tokenizer"]["vocab_file"] = str(TOKENIZER_MODEL)
    for key, name in (("train_dataset", "train.json"), ("eval_dataset", "dev.json")):
        cfg[key]["data_loader"]["dataset_dir"] = os.path.join(str(ADGEN_DIR), name)
        cfg[key]["tokenizer"]["vocab_file"] = str(TOKENIZER_MODEL)
        cfg[key]["max_source_length"] = cfg[key]["max_target_length"] = 32
    cfg["train_dataset"]["batch_size"] = cfg["runner_config"]["batch_size"] = batch_size
    cfg["parallel"]["gradients_mean"] = True
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


def _rows(path, steps):
    rows = {}
    for line in open(path):
        r = json.loads(line)
        rows.setdefault((r["epoch"], r["k"]), r["rows"])
    return [rows[(0, k)] for k in range(steps)]


@pytest.mark.slow
def test_two_rank_data_parallel_finetune_on_cpu_matches_one_process(tmp_path):
    from convert.ms_ckpt import MSCheckpoint
    steps = 3
    rec = tmp_path / "rows"
    rec.mkdir()
    env = {"GLM_LAUNCH_WORKER": f"{sys.executable} -m tests.scripts.record_worker", "RECORD_DIR": str(rec),
           "GLOG_v": "3"}
    dp_cfg = _tiny_dp_config(tmp_path / "dp.yaml", 4, "dp_out")  # relative: resolved by the launcher
    r = _launch(["-", dp_cfg, "[0,2)", "finetune", "--", "--train_steps", str(steps), "--no_progress"], tmp_path,
                env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr + "".join(
        (tmp_path / "output" / "log" / f"rank_{i}" / "worker.log").read_text()[-3000:] for i in (0, 1))

    one_cfg = _tiny_dp_config(tmp_path / "one.yaml", 8, tmp_path / "one_out")
    e = dict(os.environ, PYTHONPATH=ROOT, RECORD_DIR=str(rec), GLOG_v="3")
    for k in ("RANK_ID", "RANK_SIZE", "MS_ROLE"):
        e.pop(k, None)
    one = subprocess.run([sys.executable, "-m", "tests.scripts.record_worker", "--config", one_cfg, "--run_mode",
                          "finetune", "--train_steps", str(steps), "--no_progress"], cwd=tmp_path, env=e,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    # each rank saw its own half of every global batch
    single = _rows(rec / "rows_single.jsonl", steps)
    r0, r1 = _rows(rec / "rows_0.jsonl", steps), _rows(rec / "rows_1.jsonl", steps)
    for k in range(steps):
        assert len(single[k]) == 8 and r0[k] == single[k][:4] and r1[k] == single[k][4:], k
    assert not set(sum(r0, [])) & set(sum(r1, []))

    # both ranks end with the same weights, equal to the one-process run
    name = f"tiny-glm2-lora-1_{steps}.ckpt"
    ck0 = MSCheckpoint(str(tmp_path / "dp_out" / "checkpoint" / "rank_0" / name))
    ck1 = MSCheckpoint(str(tmp_path / "dp_out" / "checkpoint" / "rank_1" / name))
    ref = MSCheckpoint(str(tmp_path / "one_out" / "checkpoint" / "rank_0" / name))
    lora = [n for n in ref.names if "mindpet_delta_lora" in n]  # weights and their Adam moments
    assert len([n for n in lora if not n.startswith("adam_")]) == 4 and sorted(ck0.names) == sorted(ref.names)
    trained = {}
    for n in ref.names:
        if n in ("world_size", "rank_id"):  # the run record: which run and rank wrote the file
            assert [int(c.read(n)[0]) for c in (ck0, ck1, ref)] == ([2, 2, 1] if n == "world_size" else [0, 1, 0])
            continue
        if n not in lora:  # step counters and loss scale
            np.testing.assert_array_equal(ck0.read(n), ref.read(n), err_msg=n)
            np.testing.assert_array_equal(ck1.read(n), ref.read(n), err_msg=n)
            continue
        a, b, c = ck0.read(n), ck1.read(n), ref.read(n)
        np.testing.assert_array_equal(a, b, err_msg=n)
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5, err_msg=n)
        trained[n] = c
    # training moved the weights: lora_b starts at zero
    assert all(np.abs(trained[n]).max() > 1e-4 for n in lora if n.endswith("lora_b") and not n.startswith("adam_"))
    # rank 0's loss log: the mean loss over the global batch, as the one-process run's
    dp_loss = [json.loads(x)["loss"] for x in open(tmp_path / "dp_out" / "loss_log.jsonl")]
    one_loss = [json.loads(x)["loss"] for x in open(tmp_path / "one_out" / "loss_log.jsonl")]
    np.testing.assert_allclose(dp_loss, one_loss, rtol=0, atol=1e-5)
    assert not (tmp_path / "dp_out" / "checkpoint" / "rank_2").exists()


@pytest.mark.slow
def test_a_real_rank_crashing_mid_training_stops_the_other(tmp_path):
    rec = tmp_path / "rows"
    rec.mkdir()
    cfg = yaml.safe_load(open(_tiny_dp_config(tmp_path / "dp.yaml", 4, "dp_out")))
    cfg["runner_config"]["epochs"] = 20  # 600 steps: minutes, unless stopped
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    env = {"GLM_LAUNCH_WORKER": f"{sys.executable} -m tests.scripts.record_worker", "RECORD_DIR": str(rec),
           "RECORD_CRASH_RANK": "1", "RECORD_CRASH_EPOCH": "1", "RECORD_CRASH_BATCH": "0", "GLOG_v": "3"}
    r = _launch(["--grace", "5", "-", str(tmp_path / "dp.yaml"), "[0,2)", "finetune", "--", "--train_steps", "600",
                 "--no_progress"], tmp_path, env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rank 1 failed (exit code 1)" in r.stderr and "stopping scheduler, rank 0" in r.stderr
    assert "  | injected crash at epoch 1 batch 0" in r.stderr
    steps = len(open(tmp_path / "dp_out" / "loss_log.jsonl").readlines())
    assert 50 <= steps < 600, steps  # the crash came after the first epoch (62 steps), mid-training
    assert "trained" not in (tmp_path / "output" / "log" / "rank_0" / "worker.log").read_text()


@pytest.mark.slow
def test_two_rank_eval_and_predict_match_one_process(tmp_path):
    """eval and predict under the launcher: each rank answers its share (rank r takes items r, r+2, ...),
    rank 0 gathers them and writes the files, equal to a one-process run's (batch size 1, so both runs
    compute every sample alike); only rank 0 writes."""
    from mindspore_glm.run import main
    cfg = yaml.safe_load(open(_tiny_dp_config(tmp_path / "base.yaml", 4, "unused")))
    cfg["eval_dataset"].update(num_samples=3, batch_size=1, max_target_length=4)
    cfg["model"]["model_config"]["max_decode_length"] = 32 + 4      # the total: prompt (<= 32) + 4
    cfg["model"]["model_config"].pop("pet_config")                  # the base model: no adapter to load
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    texts = ["类型#裙*颜色#红色", "类型#上衣*材质#棉", "类型#裤*风格#休闲"]   # 3 items on 2 ranks: uneven shares
    env = {"GLOG_v": "3"}
    for status, extra in (("eval", []), ("predict", texts)):
        r = _launch(["-", str(config), "[0,2)", status, *extra, "--", "--output_dir", str(tmp_path / "dp"),
                     "--no_progress"], tmp_path, env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr + "".join(
            (tmp_path / "output" / "log" / f"rank_{i}" / "worker.log").read_text()[-3000:] for i in (0, 1))
        log1 = (tmp_path / "output" / "log" / "rank_1" / "worker.log").read_text()
        share = "answered 1 of 3 samples" if status == "eval" else "answered 1 of 3 texts"
        assert f"rank 1: {share}; rank 0 writes the results" in log1
        args = ["--config", str(config), "--run_mode", status, "--output_dir", str(tmp_path / "one"), "--no_progress"]
        assert main(args + (["--predict_data", *texts] if extra else [])) == 0
    for name in ("eval_predictions.jsonl", "eval_results.json", "predict_results.jsonl"):
        one = (tmp_path / "one" / name).read_text(encoding="utf-8")
        assert (tmp_path / "dp" / name).read_text(encoding="utf-8") == one, name
    assert len((tmp_path / "one" / "eval_predictions.jsonl").read_text().splitlines()) == 3
    assert [json.loads(x)["query"] for x in open(tmp_path / "dp" / "predict_results.jsonl")] == texts
    assert not [p for p in os.listdir(tmp_path / "dp") if p.endswith(".tmp")]


@pytest.mark.slow
def test_kill_9_of_the_launcher_stops_a_real_two_rank_run(tmp_path):
    """A real 2-rank data-parallel fine-tune on CPU (scheduler + 2 MindSpore ranks), the launcher killed
    with SIGKILL mid-training: after 5 s nothing of the launch is left running."""
    cfg = yaml.safe_load(open(_tiny_dp_config(tmp_path / "dp.yaml", 4, "dp_out")))
    cfg["runner_config"]["epochs"] = 20  # 600 steps: minutes, unless stopped
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    p = _start(["-", str(tmp_path / "dp.yaml"), "[0,2)", "finetune", "--", "--train_steps", "600", "--no_progress"],
               tmp_path, {"GLOG_v": "3"})
    try:
        log = tmp_path / "dp_out" / "loss_log.jsonl"
        deadline = time.monotonic() + 240
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and p.poll() is None, p.poll()
            time.sleep(0.2)
        pids, reaper, token = _tree(p.pid)
        assert len(pids) >= 4  # scheduler, 2 ranks, reaper
        _kill_9_and_check(p, pids, reaper, token)
        assert log.read_text().count("\n") < 600
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
