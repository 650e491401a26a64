"""``glm2-chat`` through a pseudo-terminal: two turns equal to ``chat()``'s greedy answers with history,
``/clear``, and Ctrl-C mid-answer keeping the session."""
import os
import pty
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY_MODEL, TOKENIZER_MODEL
from tests.serve.conftest import ms_checkpoint


def _controlling_tty():
    import fcntl
    import termios
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Pty:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        # the slave becomes the child's controlling terminal: Ctrl-C written to the master is its SIGINT
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, cwd=str(ROOT),
                                     preexec_fn=_controlling_tty, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        os.close(slave)
        self.buf = b""

    def read_until(self, pattern: bytes, timeout=180) -> bytes:
        import select
        deadline = time.time() + timeout
        while pattern not in self.buf:
            if time.time() > deadline:
                raise AssertionError(f"no {pattern!r} in {self.buf[-500:]!r}")
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    self.buf += os.read(self.master, 4096)
                except OSError:
                    break
        i = self.buf.index(pattern) + len(pattern)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, data: bytes):
        os.write(self.master, data)


def _answer(chunk: bytes) -> str:
    text = chunk.decode("utf-8")
    return re.search(r"ChatGLM2: (.*?)\r?\n", text, re.S).group(1)


def test_two_turns_clear_and_ctrl_c(torch_backend):
    b = torch_backend
    n = 12
    first, hist = b.model.chat(b.tokenizer, "你好", max_new_tokens=n, do_sample=False)
    second, _ = b.model.chat(b.tokenizer, "讲个笑话", hist, max_new_tokens=n, do_sample=False)
    t = Pty([sys.executable, "-m", "glm_serve.chat", "--backend", "torch", "--model", str(TINY_MODEL),
             "--tokenizer", str(TOKENIZER_MODEL), "--temperature", "0", "--max-tokens", str(n)])
    try:
        t.read_until(b"You: ")
        t.send("你好\n".encode())
        assert _answer(t.read_until(b"You: ")) == first
        t.send("讲个笑话\n".encode())
        assert _answer(t.read_until(b"You: ")) == second          # with the first turn as history
        t.send(b"/clear\n")
        assert b"history cleared" in t.read_until(b"You: ")
        t.send("你好\n".encode())
        assert _answer(t.read_until(b"You: ")) == first           # no history again
        t.proc.terminate()
        t.proc.wait(30)
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
    # Ctrl-C mid-answer: a long answer, interrupted as soon as it starts
    t = Pty([sys.executable, "-m", "glm_serve.chat", "--backend", "torch", "--model", str(TINY_MODEL),
             "--tokenizer", str(TOKENIZER_MODEL), "--temperature", "0"])
    try:
        t.read_until(b"You: ")
        t.send("你好\n".encode())
        t.read_until(b"ChatGLM2: ")
        t.send(b"\x03")
        out = t.read_until(b"You: ")
        assert b"[stopped]" in out
        t.send("你好\n".encode())                                 # the session goes on
        t.read_until(b"ChatGLM2: ")
        t.send(b"\x03")
        t.read_until(b"You: ")
        t.send(b"/exit\n")
        assert t.proc.wait(30) == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()


@pytest.mark.slow
def test_ctrl_c_on_mindspore_stops_the_answer_not_the_process(tmp_path_factory):
    """MindSpore's runtime installs a SIGINT handler that ends the process while it runs a graph:
    Ctrl-C must still stop only the answer, twice, and the session must go on (as on torch)."""
    t = Pty([sys.executable, "-m", "glm_serve.chat", "--backend", "mindspore", "--model",
             ms_checkpoint(tmp_path_factory), "--tokenizer", str(TOKENIZER_MODEL), "--temperature", "0"])
    try:
        t.read_until(b"You: ", timeout=600)
        for _ in range(2):                                       # the second after MindSpore's graphs ran
            t.send("你好\n".encode())
            t.read_until(b"ChatGLM2: ", timeout=600)
            t.send(b"\x03")
            assert b"[stopped]" in t.read_until(b"You: ", timeout=600)
        t.send(b"\x03")                                          # at the prompt: a hint, not an exit
        assert b"(/exit quits)" in t.read_until(b"You: ", timeout=600)
        t.send(b"/exit\n")
        assert t.proc.wait(60) == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()


def test_piped_stdin(torch_backend):
    """Not a terminal: the answers still stream (Ctrl-C stays a signal there)."""
    b = torch_backend
    want = b.model.chat(b.tokenizer, "你好", max_new_tokens=5, do_sample=False)[0]
    out = subprocess.run([sys.executable, "-m", "glm_serve.chat", "--backend", "torch", "--model", str(TINY_MODEL),
                          "--tokenizer", str(TOKENIZER_MODEL), "--temperature", "0", "--max-tokens", "5"],
                         input="你好\n/exit\n", capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert f"ChatGLM2: {want}\n" in out.stdout
