"""Shared pytest setup: fixture paths, the cuda/ascend skips, quiet backends."""
import os
import pathlib
import re

import pytest

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TOKENIZER_MODEL = FIXTURES / "tokenizer" / "tiny_glm2_sp.model"
TOKENIZER_CASES = FIXTURES / "tokenizer" / "cases.json"
TINY_MODEL = FIXTURES / "model" / "tiny_glm2"
TINY_PTUNING_MODEL = FIXTURES / "model" / "tiny_glm2_ptuning"
ADGEN_DIR = FIXTURES / "data" / "adgen"


# MindSpore's CPU backend has no bfloat16 kernel for some operators (Gather, MatMul in 2.9); its error:
#   Select CPU operator[Gather] fail! Unsupported data type! ... but get input[BFloat16 ...
BF16_KERNEL_UNSUPPORTED = re.compile(r"Select CPU operator\[(\w+)\] fail! Unsupported data type!.*"
                                     r"but get input\[BFloat16", re.S)


def skip_if_no_bf16_kernel(error: BaseException) -> None:
    """Skip the test on that one documented error of MindSpore's CPU backend; re-raise anything else (any
    other error, or that error on another device, is a failure)."""
    import mindspore as ms
    m = BF16_KERNEL_UNSUPPORTED.search(str(error))
    if isinstance(error, TypeError) and m and ms.get_context("device_target") == "CPU":
        pytest.skip(f"MindSpore CPU has no bfloat16 {m.group(1)} kernel")
    raise error


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def _has_ascend() -> bool:
    """An Ascend session: ``GLM_TEST_DEVICE=Ascend`` in the environment (or an NPU device node present)."""
    wanted = os.environ.get("GLM_TEST_DEVICE", "").strip().lower()
    if wanted:
        return wanted == "ascend"
    return os.path.exists("/dev/davinci0")


def ascend_devices() -> list:
    """The Ascend device ids the ``ascend`` tests use: ``GLM_ASCEND_DEVICES`` (e.g. ``0,1,2,3``), else
    ``DEVICE_ID`` and the three after it, else 0-3."""
    listed = os.environ.get("GLM_ASCEND_DEVICES", "").strip()
    if listed:
        return [int(d) for d in listed.split(",") if d.strip()]
    first = int(os.environ.get("DEVICE_ID", "0"))
    return list(range(first, first + 4))


def pytest_collection_modifyitems(config, items):
    skip_cuda = None if _has_cuda() else pytest.mark.skip(reason="needs a CUDA GPU")
    skip_ascend = None if _has_ascend() else pytest.mark.skip(reason="needs an Ascend NPU (GLM_TEST_DEVICE=Ascend)")
    for item in items:
        if skip_cuda and "cuda" in item.keywords:
            item.add_marker(skip_cuda)
        if skip_ascend and "ascend" in item.keywords:
            item.add_marker(skip_ascend)


@pytest.fixture(scope="session")
def tokenizer():
    from glm_common.tokenizer import ChatGLM2Tokenizer
    return ChatGLM2Tokenizer(str(TOKENIZER_MODEL))
