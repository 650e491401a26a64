"""The launcher's bad arguments (scripts/run_distribute.sh), each run for real (ranks would be the stand-in
worker tests/scripts/fake_worker.py): *refused cleanly* when the launcher exits 2 with an ``error:`` line
naming the problem, no Python traceback, and nothing started or written. :data:`CASES` are cases of the
fault matrix (``tests/faults/cases.py``). The launcher's process faults (a crashing rank, a rank ignoring
SIGTERM, a failing scheduler, SIGTERM and kill -9 of the launcher) are the ``faults``-marked tests of
``tests/scripts/test_run_distribute.py``, which check more of each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "run_distribute.sh")
TINY = os.path.join(ROOT, "configs", "tiny", "run_tiny_lora.yaml")
GLM2_LORA = os.path.join(ROOT, "configs", "glm2", "run_glm2_6b_lora.yaml")
GLM2_FT = os.path.join(ROOT, "configs", "glm2", "run_glm2_6b_finetune.yaml")
FAKE = f"{sys.executable} -m tests.scripts.fake_worker"


def _table(path, n):
    from hccl.rank_table import new_device, new_server, new_table
    srv = [new_server("10.0.0.1", [new_device(d, f"192.{d + 1}.27.6", d) for d in range(n)])]
    with open(path, "w") as f:
        json.dump(new_table(srv), f)
    return path


def _env(fake, **extra):
    os.makedirs(fake, exist_ok=True)
    e = dict(os.environ, PYTHON=sys.executable, GLM_LAUNCH_WORKER=FAKE, GLM_LAUNCH_SCHEDULER=FAKE + " --scheduler",
             FAKE_OUT=fake, PYTHONPATH=ROOT, **{k: str(v) for k, v in extra.items()})
    e.pop("GLM_DRY_RUN", None)
    return e


def bad_input(tmp, name, args, expected):
    """Refused cleanly: exit 2, the expected words on an ``error:`` line, no traceback, nothing started."""
    fake = os.path.join(tmp, name.replace(" ", "_"))
    r = subprocess.run(["bash", SCRIPT, "--output", os.path.join(fake, "out"), *args], cwd=tmp, env=_env(fake),
                       capture_output=True, text=True, timeout=120)
    errs = [x for x in r.stderr.splitlines() if "error:" in x]
    ok = (r.returncode == 2 and any(expected in x for x in errs) and "Traceback" not in r.stderr
          and not [f for f in os.listdir(fake) if f.endswith(".json")]
          and not os.path.exists(os.path.join(fake, "out")))
    return ok, (errs[0] if errs else f"exit {r.returncode}, no error: line: {r.stderr.strip()[-200:]}")


def _file(tmp, name, write):
    """``tmp/name``, written by ``write(path)`` the first time it is asked for."""
    path = os.path.join(tmp, name)
    if not os.path.exists(path):
        write(path)
    return path


def _text(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)
    return write


def _bad_yaml(tmp):
    return _file(tmp, "bad.yaml", _text("model: [1, 2\n"))


def _t(tmp, n):
    return _file(tmp, f"t{n}.json", lambda p: _table(p, n))


def _broken(tmp):
    return _file(tmp, "broken.json", _text('{"version": "1.0", "server_list": [], "status": "completed"}'))


def _tight(tmp):
    """The 6B full fine-tune YAML with 16 GB per device: its plan (23 GiB with optimizer shard and recompute
    on 8 devices) does not fit."""
    with open(GLM2_FT, encoding="utf-8") as f:
        text = f.read()
    assert 'max_device_memory: "30GB"' in text
    return _file(tmp, "tight.yaml", _text(text.replace('max_device_memory: "30GB"', 'max_device_memory: "16GB"', 1)))


def _not_dir(tmp):
    return _file(tmp, "afile", _text(""))


# (name, kind, run(tmp) -> (ok, detail)); kind "refused": a bad input
CASES = [
    ("too few arguments", "refused", lambda tmp: bad_input(tmp, "few", ["-", TINY], "expected RANK_TABLE_FILE")),
    ("bad RUN_STATUS", "refused", lambda tmp: bad_input(tmp, "status", ["-", TINY, "[0,2)", "fine"], "RUN_STATUS")),
    ("empty DEVICE_RANGE", "refused", lambda tmp: bad_input(tmp, "range", ["-", TINY, "[2,2)", "finetune"],
                                                            "DEVICE_RANGE")),
    ("bad RANK_SIZE", "refused", lambda tmp: bad_input(tmp, "ranksize", ["-", TINY, "[0,2)", "finetune", "0"],
                                                       "RANK_SIZE")),
    ("missing config", "refused", lambda tmp: bad_input(tmp, "noconfig", ["-", "nope.yaml", "[0,2)", "finetune"],
                                                        "nope.yaml")),
    ("config not YAML", "refused", lambda tmp: bad_input(tmp, "badyaml", ["-", _bad_yaml(tmp), "[0,2)", "finetune"],
                                                         "not valid YAML")),
    ("Ascend without rank table", "refused", lambda tmp: bad_input(tmp, "notable", ["-", GLM2_LORA, "[0,8)",
                                                                                    "finetune"],
                                                                   "RANK_TABLE_FILE: required")),
    ("rank table of other size", "refused", lambda tmp: bad_input(tmp, "tablesize", [_t(tmp, 8), GLM2_LORA, "[0,4)",
                                                                                     "finetune"], "lists 8 devices")),
    ("broken rank table", "refused", lambda tmp: bad_input(tmp, "broken", [_broken(tmp), GLM2_LORA, "[0,8)",
                                                                           "finetune"], "RANK_TABLE_FILE")),
    ("predict without texts", "refused", lambda tmp: bad_input(tmp, "predict", ["-", TINY, "[0,2)", "predict"],
                                                               "PREDICT_DATA")),
    ("--output is a file", "refused", lambda tmp: bad_input(tmp, "outfile", ["--output",
                                                                             os.path.join(_not_dir(tmp), "x"), "-",
                                                                             TINY, "[0,2)", "finetune"],
                                                            "not a directory")),
    ("layout that does not fit", "refused", lambda tmp: bad_input(tmp, "memory", [_t(tmp, 8), _tight(tmp), "[0,8)",
                                                                                  "finetune"], "does not fit")),
]

