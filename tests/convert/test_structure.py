"""convert/ and hccl/ as a newcomer reads them: one bfloat16 helper and one dtype table
(convert/safetensors_io.py), one vocabulary of training-state names (glm_common.names), no sys.path
patching, and the script forms still run from any folder. (No import cycle: tests/test_import_graph.py.)"""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PKGS = ("convert", "hccl")


def modules():
    for pkg in PKGS:
        for f in sorted(os.listdir(ROOT / pkg)):
            if f.endswith(".py"):
                yield f"{pkg}.{f[:-3]}", (ROOT / pkg / f).read_text(encoding="utf-8")


def test_one_bfloat16_helper_one_dtype_table_one_training_state_vocabulary():
    for m, src in modules():
        if m != "convert.safetensors_io":
            assert "import ml_dtypes" not in src, m
            assert '"BF16"' not in src and '"BFloat16"' not in src, m
        for literal in ('"adam_m."', '"loss_scale"', '"global_step"', '"accu_grads."'):
            assert literal not in src, (m, literal)
        assert "sys.path" not in src, m


@pytest.mark.parametrize("script", ["convert/hf_to_ms.py", "convert/ms_to_hf.py", "convert/merge_shards.py",
                                    "convert/adapters.py", "hccl/hccl_tools.py", "hccl/merge_hccl.py",
                                    "hccl/validate.py"])
def test_script_forms_run_from_another_folder(tmp_path, script):
    res = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr
