"""convert/ and hccl/ as a newcomer reads them: no import cycle (nor a function-local import hiding one),
one bfloat16 helper and one dtype table (convert/safetensors_io.py), one vocabulary of training-state names
(glm_common.names), no sys.path patching, and the script forms still run from any folder."""
import ast
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


def imports(src: str, top_level_only: bool):
    tree = ast.parse(src)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] in PKGS:
            yield n.module if n.module not in PKGS else f"{n.module}.{n.names[0].name}"
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.split(".")[0] in PKGS:
                    yield a.name


def test_no_import_cycle_even_through_function_local_imports():
    graph = {m: {d for d in imports(src, top_level_only=False) if d != m} for m, src in modules()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", " -> ".join(path + [m])
        state[m] = "open"
        for d in graph.get(m, ()):
            visit(d, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


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
