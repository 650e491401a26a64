"""Every console command of pyproject.toml's [project.scripts], given a bad input: a non-zero exit, a last
line naming the file or field, never a traceback, nothing half-written, the inputs unchanged.

Each command is run as the installed script runs it (``from <module> import main; sys.exit(main())``)."""
import hashlib
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL, TOKENIZER_MODEL

TINY_LORA = ROOT / "configs" / "tiny" / "run_tiny_lora.yaml"


def _scripts() -> dict:
    text = open(ROOT / "pyproject.toml", encoding="utf-8").read()
    block = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', block, re.M))


SCRIPTS = _scripts()


def run_script(name, *args, timeout=240, cwd=ROOT):
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOG_v": "3"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def digest(*paths):
    out = {}
    for p in map(str, paths):
        files = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
        for f in files:
            out[f] = hashlib.sha256(open(f, "rb").read()).hexdigest()
    return out


def assert_one_line(res, *words):
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out[-3000:]
    assert res.returncode not in (0, None), out[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("[")]  # ([...]: MindSpore's log)
    assert lines, res.stderr[-3000:]
    last = lines[-1]                     # the error line (``error: ...``; the hccl and serve tools use their own prefix)
    for w in words:
        assert str(w) in last, last
    return last


def test_every_console_command_is_listed_here():
    assert set(SCRIPTS) == set(QUICK) | {"glm2-run", "glm2-train"}


# command -> (argument builder given tmp_path, words the error line must hold)
QUICK = {
    "glm2-hf-to-ms": (lambda t: ["--hf-dir", t / "none", "--output", t / "o.ckpt"], ["none"]),
    "glm2-ms-to-hf": (lambda t: ["--ckpt", t / "none.ckpt", "--config", TINY_MODEL, "--output", t / "o"],
                      ["none.ckpt"]),
    "glm2-merge-shards": (lambda t: ["--src", t / "none", "--output", t / "o.ckpt", "--quiet"], ["none"]),
    "glm2-adapters": (lambda t: ["peft-to-ms", "--adapter", t, "--output", t / "sub" / "o.ckpt"],
                      ["adapter_config.json"]),
    "glm2-hf-layout": (lambda t: ["info", t / "none"], ["none"]),
    "glm2-hccl-tools": (lambda t: ["--device_num", "[0,99)", "--output", t], ["device_num"]),
    "glm2-merge-hccl": (lambda t: [t / "none.json"], ["none.json"]),
    "glm2-hccl-validate": (lambda t: [t / "none.json"], ["none.json"]),
    "glm2-data": (lambda t: ["check", t / "none.json"], ["none.json"]),
    "glm2-serve": (lambda t: ["--backend", "torch", "--model", t / "none", "--port", "0"], ["none"]),
    "glm2-chat": (lambda t: ["--backend", "torch", "--model", t / "none"], ["none"]),
}


@pytest.mark.parametrize("name", sorted(QUICK))
def test_bad_input_gives_one_line(name, tmp_path):
    build, words = QUICK[name]
    before = sorted(os.listdir(tmp_path))
    assert_one_line(run_script(name, *build(tmp_path)), *words)
    assert sorted(os.listdir(tmp_path)) == before          # nothing written


def test_data_check_on_a_fifo_and_dev_zero_does_not_hang(tmp_path):
    fifo = tmp_path / "rows.json"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        assert_one_line(run_script("glm2-data", "check", path, timeout=60), path, "not a regular file")


def test_ms_to_hf_with_a_bad_tokenizer(tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    from convert import hf_to_ms
    assert hf_to_ms.main(["--hf-dir", str(TINY_MODEL), "--output", str(ckpt), "--no-progress"]) == 0
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    before = digest(ckpt, bad)
    assert_one_line(run_script("glm2-ms-to-hf", "--ckpt", ckpt, "--config", TINY_MODEL, "--output", tmp_path / "o",
                               "--tokenizer", bad, "--no-progress"), "tokenizer.model")
    assert not (tmp_path / "o").exists() and digest(ckpt, bad) == before


def test_adapters_bad_regex_in_pet_config(tmp_path):
    from tests.convert.test_adapter_checks import _ms_lora
    ckpt, pet = _ms_lora(tmp_path, 8)
    yaml.safe_dump({"pet_config": {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 8, "target_modules": "(qkv"}},
                   open(pet, "w"))
    assert_one_line(run_script("glm2-adapters", "ms-to-peft", "--ckpt", ckpt, "--pet-config", pet, "--output",
                               tmp_path / "peft"), "pet.yaml", "target_modules", "regular expression")


def _run_yaml(tmp_path, **changes):
    cfg = yaml.safe_load(open(TINY_LORA, encoding="utf-8"))
    cfg["load_checkpoint"] = str(TINY_MODEL)
    for part in ("train_dataset", "eval_dataset"):
        cfg[part]["tokenizer"]["vocab_file"] = str(TOKENIZER_MODEL)
    cfg["train_dataset"]["data_loader"]["dataset_dir"] = str(ADGEN_DIR / "train.json")
    cfg["eval_dataset"]["data_loader"]["dataset_dir"] = str(ADGEN_DIR / "dev.json")
    cfg["output_dir"] = str(tmp_path / "out")
    for path, value in changes.items():
        node = cfg
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    out = tmp_path / "run.yaml"
    yaml.safe_dump(cfg, open(out, "w", encoding="utf-8"))
    return out


@pytest.mark.parametrize("case", ["bad json", "not utf-8", "wrong-shape weight", "typo in the yaml"])
def test_torch_trainer_bad_inputs(tmp_path, case):
    data = tmp_path / "train.json"
    changes = {}
    if case == "bad json":
        data.write_text('{"content": "a", "summary": "b"}\n{"content": "a", "summ\n', encoding="utf-8")
        changes["train_dataset.data_loader.dataset_dir"] = str(data)
        words = ("train.json",)
    elif case == "not utf-8":
        data.write_bytes(b'{"content": "\xff\xfe", "summary": "b"}\n')
        changes["train_dataset.data_loader.dataset_dir"] = str(data)
        words = ("train.json", "UTF-8")
    elif case == "wrong-shape weight":
        from tests.convert.test_integrity import QKV0, tiny_with
        model = tiny_with(tmp_path, lambda t: t.__setitem__(QKV0, t[QKV0][:-1]))
        changes["load_checkpoint"] = model
        words = (QKV0, "shape")
    else:
        changes["runner_config.epoch"] = 1
        words = ("run.yaml", "runner_config.epoch", "did you mean")
    cfg = _run_yaml(tmp_path, **changes)
    before = digest(cfg, *(p for p in [data] if p.exists()))
    res = run_script("glm2-train", "--config", cfg, "--max_steps", "1", "--no_progress", "--device", "cpu")
    assert_one_line(res, *words)
    assert digest(cfg, *(p for p in [data] if p.exists())) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", ["use_parallel without a launcher", "device_target GPU"])
def test_mindspore_runner_launch_errors(tmp_path, case):
    if case.startswith("use_parallel"):
        cfg, words = _run_yaml(tmp_path, use_parallel=True), ("use_parallel", "--use_parallel False")
    else:
        cfg, words = _run_yaml(tmp_path, **{"context.device_target": "GPU"}), ("context.device_target", "GPU")
    env_free = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "MS_", "OMPI_"))}
    module, func = SCRIPTS["glm2-run"].split(":")
    res = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())",
                          "--config", str(cfg), "--no_progress"], capture_output=True, text=True, timeout=400,
                         cwd=ROOT, env={**env_free, "PYTHONPATH": str(ROOT), "GLOG_v": "3"})
    assert_one_line(res, *words)


def test_data_features_onto_a_full_disk(tmp_path, monkeypatch, capsys):
    """zipfile reports a failed write (ENOSPC) as ValueError("seek of closed file"): one line, nothing left."""
    import numpy as np
    from glm_common.data import __main__ as data_cli

    def full(f, **arrays):
        f.write(b"PK")
        raise ValueError("seek of closed file")
    monkeypatch.setattr(np, "savez", full)
    out = tmp_path / "f.npz"
    rc = data_cli.main(["features", str(ADGEN_DIR / "train.json"), "--tokenizer", str(TOKENIZER_MODEL),
                        "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "f.npz: cannot write" in err[0], err
    assert os.listdir(tmp_path) == []
