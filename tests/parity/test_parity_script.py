"""scripts/parity.py on the tiny golden directories (pass, injected mismatch, inputs, bad arguments) and,
marked ``slow``, on a full-size random ChatGLM2-6B checkpoint where the machine has the memory."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, TINY_MODEL, TINY_PTUNING_MODEL
from tests.parity.helpers import golden

SCRIPT = ROOT / "scripts" / "parity.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("parity_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


parity = _load_script()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The golden tiny model as an HF directory with its tokenizer (as ``python -m convert.hf_layout tiny``)."""
    from convert.hf_layout import write_tiny_hf_dir
    return write_tiny_hf_dir(str(tmp_path_factory.mktemp("tiny") / "tiny_glm2"))


def _run(capsys, *argv):
    code = parity.main([*map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fp32_pass_report_and_dump(tiny_dir, tmp_path, capsys):
    code, out, err = _run(capsys, "--hf-dir", tiny_dir, "--generate", 6, "--report", tmp_path / "r.json",
                          "--dump", tmp_path / "d.npz")
    assert code == 0, out + err
    assert "result: PASS" in out and "max |logit diff|" in out and "greedy agreement" in out
    report = json.loads((tmp_path / "r.json").read_text())
    m = report["metrics"]
    assert report["ok"] and report["atol"] == 1e-4 and report["inputs"]["batch"] == len(parity.DEFAULT_PROMPTS)
    assert m["max_abs_diff"] < 1e-4 and m["min_cosine"] > 0.999999 and m["top1_agreement"] == 1.0
    assert m["greedy_steps"] == 6 and m["greedy_agreement"] == 1.0
    assert report["mindspore"]["convert_s"] is not None and report["torch"]["forward_s"] > 0
    with np.load(tmp_path / "d.npz") as d:
        assert d["torch_logits"].dtype == d["ms_logits"].dtype == np.float32
        assert d["torch_logits"].shape == d["ms_logits"].shape == d["input_ids"].shape + (3072,)
        mask = d["attention_mask"].astype(bool)
        assert (~mask).any()                                  # prompts of different lengths: left padding
        diff = np.abs(d["torch_logits"] - d["ms_logits"])[mask].max()
        assert abs(diff - m["max_abs_diff"]) < 1e-9


def test_inputs_npz_ptuning(tmp_path, capsys):
    """--inputs with the golden batch of the P-tuning model (no tokenizer needed): logits within 1e-4."""
    g = golden(TINY_PTUNING_MODEL)
    np.savez(tmp_path / "in.npz", input_ids=g["batch_input_ids"], attention_mask=g["batch_attention_mask"],
             position_ids=g["batch_position_ids"])
    code, out, err = _run(capsys, "--hf-dir", TINY_PTUNING_MODEL, "--inputs", tmp_path / "in.npz",
                          "--generate", 0, "--report", tmp_path / "r.json", "--dump", tmp_path / "d.npz")
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"]["positions"] == int(g["batch_attention_mask"].sum())
    with np.load(tmp_path / "d.npz") as d:
        keep = g["batch_attention_mask"].astype(bool)
        assert np.abs(d["torch_logits"] - g["batch_logits"])[keep].max() < 1e-4   # and torch is golden
        assert np.abs(d["ms_logits"] - g["batch_logits"])[keep].max() < 1e-4


def test_prompts_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("你好\n\n介绍一下这件连衣裙\n", encoding="utf-8")
    code, out, err = _run(capsys, "--hf-dir", tiny_dir, "--prompts", tmp_path / "p.txt", "--generate", 2,
                          "--report", tmp_path / "r.json")
    assert code == 0, out + err
    assert json.loads((tmp_path / "r.json").read_text())["inputs"]["batch"] == 2   # the blank line is skipped


def test_perturbed_ckpt_fails(tiny_dir, tmp_path, capsys):
    """An injected mismatch (noise of 1e-3 on the MindSpore output layer) exits 1 naming the metric."""
    from convert.hf_to_ms import convert_hf_to_ms
    from convert.ms_ckpt import MSCheckpoint, save_ms_checkpoint
    convert_hf_to_ms(tiny_dir, str(tmp_path / "ok.ckpt"), progress=False)
    src = MSCheckpoint(str(tmp_path / "ok.ckpt"))
    rng = np.random.default_rng(0)

    def tensors():
        for name in src.names:
            a = src.read(name)
            if name == "transformer.output_layer.weight":
                a = (a + rng.normal(0, 1e-3, a.shape)).astype(a.dtype)
            yield name, a
    save_ms_checkpoint(tensors(), str(tmp_path / "bad.ckpt"))
    code, out, err = _run(capsys, "--hf-dir", tiny_dir, "--ms-ckpt", tmp_path / "bad.ckpt", "--generate", 0,
                          "--report", tmp_path / "r.json")
    assert code == 1
    assert "result: FAIL (max_abs_diff" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["ok"] and not report["checks"]["max_abs_diff"]["ok"] and report["checks"]["max_abs_diff"]["value"] > 1e-4
    # the same checkpoint passes with a tolerance above the injected error
    code, out, _ = _run(capsys, "--hf-dir", tiny_dir, "--ms-ckpt", tmp_path / "bad.ckpt", "--generate", 0,
                        "--atol", 0.5)
    assert code == 0, out


@pytest.mark.parametrize("argv,message", [
    ([], "the following arguments are required: --hf-dir"),
    (["--hf-dir", "X", "--torch-dtype", "fp8"], "argument --torch-dtype: invalid choice: 'fp8'"),
    (["--hf-dir", "X", "--prompts", "a", "--inputs", "b"], "argument --inputs: not allowed with argument --prompts"),
    (["--hf-dir", "X", "--generate", "many"], "argument --generate: invalid int value: 'many'"),
])
def test_bad_arguments_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parity.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_bad_inputs_one_line(tmp_path, capsys):
    np.savez(tmp_path / "noids.npz", ids=np.zeros((1, 3), np.int64))
    np.savez(tmp_path / "badmask.npz", input_ids=np.ones((2, 3), np.int64), attention_mask=np.ones((2, 4), np.int64))
    cases = [
        (["--hf-dir", tmp_path / "missing"], "missing: not an HF ChatGLM2 directory (no config.json) (--hf-dir)"),
        (["--hf-dir", TINY_MODEL, "--ms-ckpt", tmp_path / "none.ckpt"], "none.ckpt: no such file (--ms-ckpt)"),
        (["--hf-dir", TINY_MODEL, "--inputs", tmp_path / "noids.npz"], "noids.npz: input_ids: missing (keys: ids)"),
        (["--hf-dir", TINY_MODEL, "--inputs", tmp_path / "badmask.npz"],
         "badmask.npz: attention_mask: shape [2, 4] differs from input_ids [2, 3]"),
        (["--hf-dir", TINY_MODEL], "tokenizer.model: no such file (the default prompts need the tokenizer"),
        (["--hf-dir", TINY_MODEL, "--atol", "-1", "--inputs", tmp_path / "noids.npz"], "--atol: expected a positive number"),
    ]
    for argv, message in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1 and not out, (argv, err)


def test_command_line_fp16(tiny_dir, tmp_path):
    """The script as a user runs it, both backends in float16 (default atol 5e-2; measured ~6e-3)."""
    env = dict(os.environ, GLOG_v="3")
    p = subprocess.run([sys.executable, str(SCRIPT), "--hf-dir", tiny_dir, "--torch-dtype", "fp16", "--ms-dtype", "fp16",
                        "--generate", "2", "--report", str(tmp_path / "r.json"), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "result: PASS" in p.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["atol"] == 5e-2 and 1e-5 < report["metrics"]["max_abs_diff"] < 1.5e-2


# ---------------------------------------------------------------------------------------- full size
GiB = 2 ** 30
#: MindSpore fp32 on CPU holds 25 GB of parameters plus the 12.5 GB fp16 .ckpt it reads; torch fp32 on
#: CPU 25 GB (the phases do not overlap); the random checkpoint is written one tensor at a time.
NEEDED_RAM = 48 * GiB
NEEDED_DISK = 30 * GiB    # 12.5 GB HF checkpoint + 12.5 GB converted .ckpt


def _available_ram() -> int:
    import psutil
    return psutil.virtual_memory().available


def _write_random_glm2_6b(out_dir: str, seed: int = 0) -> str:
    """A full-size ChatGLM2-6B HF directory (fp16 safetensors shards) with N(0, 0.02) weights and unit
    norms, written one tensor at a time, with the tiny tokenizer (ids stay below 3005 < 65024)."""
    from convert.hf_layout import write_hf_checkpoint
    from glm_common.config import preset
    from glm_common.names import hf_param_shapes
    from glm_common.tokenizer import ChatGLM2Tokenizer
    from tests.conftest import TOKENIZER_MODEL
    cfg = preset("glm2_6b")
    rng = np.random.default_rng(seed)

    def tensors():
        for name, shape in hf_param_shapes(cfg).items():
            if name.endswith("layernorm.weight"):
                yield name, np.ones(shape, np.float16)
            else:
                yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    write_hf_checkpoint(tensors(), out_dir, max_shard_size="2GB")
    cfg.save_hf(out_dir)
    ChatGLM2Tokenizer(str(TOKENIZER_MODEL)).save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("torch_dtype,ms_dtype", [("fp32", "fp32"), ("fp16", "fp32")])
def test_full_size_random_glm2_6b(tmp_path_factory, torch_dtype, ms_dtype):
    """scripts/parity.py on a full-size random ChatGLM2-6B (skipped without ~48 GiB of free memory)."""
    import shutil
    if _available_ram() < NEEDED_RAM:
        pytest.skip(f"needs {NEEDED_RAM / GiB:.0f} GiB of available memory for the 6B working sets, "
                    f"{_available_ram() / GiB:.1f} GiB available")
    base = tmp_path_factory.getbasetemp()
    if shutil.disk_usage(base).free < NEEDED_DISK:
        pytest.skip(f"needs {NEEDED_DISK / GiB:.0f} GiB of free disk under {base}")
    hf_dir = str(base / "glm2_6b_random")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        _write_random_glm2_6b(hf_dir)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = str(base / f"report_{torch_dtype}_{ms_dtype}.json")
    code = parity.main(["--hf-dir", hf_dir, "--torch-device", device, "--torch-dtype", torch_dtype,
                        "--ms-dtype", ms_dtype, "--generate", "4", "--report", report, "--no-progress"])
    r = json.loads(open(report).read())
    assert code == 0, r["checks"]
    assert r["metrics"]["min_cosine"] > 0.999
