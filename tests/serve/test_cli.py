"""``glm2-serve`` / ``glm2-chat`` command lines: help, and bad input as one line with a non-zero exit."""
import subprocess
import sys

from tests.conftest import ROOT, TINY_MODEL, TOKENIZER_MODEL


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=str(ROOT), timeout=120)


def test_help():
    out = _run("-m", "glm_serve", "--help")
    assert out.returncode == 0 and "--max-batch" in out.stdout and "127.0.0.1" in out.stdout
    out = _run("-m", "glm_serve.chat", "--help")
    assert out.returncode == 0 and "/clear" not in out.stderr and "--temperature" in out.stdout


def test_bad_input_is_one_line(tmp_path):
    out = _run("-m", "glm_serve", "--backend", "torch", "--model", str(tmp_path / "nope"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"glm2-serve: {tmp_path / 'nope'}: --model: no such file or directory"
    out = _run("-m", "glm_serve", "--backend", "torch", "--model", str(TINY_MODEL))      # no tokenizer beside it
    assert out.returncode == 2 and "Traceback" not in out.stderr and "give --tokenizer" in out.stderr
    out = _run("-m", "glm_serve.chat", "--backend", "torch", "--model", str(TINY_MODEL), "--tokenizer",
               str(TOKENIZER_MODEL), "--adapter", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "neither a peft LoRA directory" in out.stderr.strip().splitlines()[-1]
    out = _run("-m", "glm_serve", "--backend", "torch", "--model", str(TINY_MODEL), "--max-batch", "0")
    assert out.returncode == 2 and "--max-batch: must be at least 1" in out.stderr


def test_empty_api_key_and_a_taken_port_are_one_line():
    out = _run("-m", "glm_serve", "--backend", "torch", "--model", str(TINY_MODEL), "--tokenizer",
               str(TOKENIZER_MODEL), "--api-key", "")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("glm2-serve: --api-key: empty")
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = _run("-m", "glm_serve", "--backend", "torch", "--model", str(TINY_MODEL), "--tokenizer",
                   str(TOKENIZER_MODEL), "--port", str(port))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "http://" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"glm2-serve: --host 127.0.0.1 --port {port}: cannot listen "
                                               f"there: Address already in use"]


def test_the_url_printed_is_the_one_served():
    """Bound before the URL is printed: ``--port 0`` prints the port the system picked, and it answers."""
    import re

    import httpx
    proc = subprocess.Popen([sys.executable, "-m", "glm_serve", "--backend", "torch", "--model", str(TINY_MODEL),
                             "--tokenizer", str(TOKENIZER_MODEL), "--port", "0"], stderr=subprocess.PIPE,
                            text=True, cwd=str(ROOT))
    try:
        for line in proc.stderr:
            m = re.search(r" on (http://127\.0\.0\.1:(\d+)) ", line)
            if m:
                break
        assert m and m.group(2) != "0"
        assert httpx.get(m.group(1) + "/health", timeout=60).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)
