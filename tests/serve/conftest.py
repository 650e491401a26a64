"""A server on localhost per backend (in this process, on a free port) over the tiny golden model."""
import contextlib
import socket
import threading
import time

import pytest

from tests.conftest import TINY_MODEL, TOKENIZER_MODEL

BACKENDS = ("torch", "mindspore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(backend, max_batch=8, max_queue=64, max_tokens=2048, api_key=None, max_body_bytes=1 << 20, start=True,
            header_timeout=10.0, body_timeout=30.0, max_connections=None, allow_origins=(), prefix_cache=0):
    """Yield ``(base_url, scheduler)`` of a running server over ``backend`` (uvicorn configured as
    ``glm2-serve`` configures it)."""
    import uvicorn

    from glm_serve.app import create_app, server_config
    from glm_serve.scheduler import Scheduler
    sched = Scheduler(backend.decoder(max_batch, prefix_cache), backend.tokenizer, backend.settings_cls, backend.seq_length,
                      [backend.tokenizer.eos_token_id], max_queue, max_tokens)
    if start:
        sched.start()
    port = free_port()
    app = create_app(sched, backend.model_id, backend.name, api_key, max_body_bytes, body_timeout, allow_origins)
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, header_timeout, max_connections=max_connections))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", sched
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sched.stop()


def _load(name, tmp_path_factory):
    from glm_serve.backends import load_backend
    if name == "torch":
        return load_backend("torch", str(TINY_MODEL), str(TOKENIZER_MODEL))
    return load_backend("mindspore", ms_checkpoint(tmp_path_factory), str(TOKENIZER_MODEL))


def ms_checkpoint(tmp_path_factory) -> str:
    """The tiny model through our converter's .ckpt (config.json beside it), as a user would serve a
    MindSpore checkpoint; converted once per session."""
    import shutil
    import subprocess
    import sys
    out = tmp_path_factory.getbasetemp() / "ms_ckpt"
    if not (out / "tiny.ckpt").exists():
        out.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "convert/hf_to_ms.py", "--hf-dir", str(TINY_MODEL), "--output",
                        str(out / "tiny.ckpt")], check=True, capture_output=True, cwd=str(TINY_MODEL.parents[3]))
        if not (out / "config.json").exists():
            shutil.copy(TINY_MODEL / "config.json", out / "config.json")
    return str(out / "tiny.ckpt")


# MindSpore compiles a graph per prompt length and per batch/cache shape: minutes on a busy CPU
@pytest.fixture(scope="session", params=["torch", pytest.param("mindspore", marks=pytest.mark.slow)])
def backend(request, tmp_path_factory):
    return _load(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def torch_backend(tmp_path_factory):
    return _load("torch", tmp_path_factory)
