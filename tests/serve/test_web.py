"""The chat page in headless Chromium (Debian's ``chromium``), driven over the DevTools protocol on a pipe:
type a message, the streamed answer appears and equals ``chat()``'s greedy answer; a second turn
carries the history; a screenshot is taken (a PNG is checked), and written to ``docs/serve_chat.png`` (shown
in the README) only with ``GLM_UPDATE_SCREENSHOTS=1`` (else to the test's temporary folder)."""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.conftest import ROOT
from tests.serve.conftest import serving

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium (Debian's chromium)")]


class DevTools:
    """Chromium with ``--remote-debugging-pipe`` (commands on fd 3, replies on fd 4, NUL-separated JSON)."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="glm2-chromium-")
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()

        def fds():
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "--window-size=1000,760", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self.buf, self.next_id, self.session = b"", 0, None

    def call(self, method, timeout=60, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if time.time() > deadline:
                raise TimeoutError(method)
            self.buf += os.read(self.from_r, 1 << 20)

    def open(self, url):
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def js(self, expr):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)["result"].get("value")

    def wait(self, expr, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(expr):
                return
            time.sleep(0.1)
        raise TimeoutError(expr)

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


def test_page_streams_an_answer(torch_backend, tmp_path):
    b = torch_backend
    n = 20
    first, hist = b.model.chat(b.tokenizer, "你好", max_new_tokens=n, do_sample=False)
    second, _ = b.model.chat(b.tokenizer, "类型#裙*颜色#蓝色", hist, max_new_tokens=n, do_sample=False)
    with serving(b) as (url, sched):
        browser = DevTools()
        try:
            browser.open(url + "/")
            browser.wait("document.readyState === 'complete' && document.getElementById('model').textContent.length > 0")
            browser.js(f"document.getElementById('temperature').value = '0'; "
                       f"document.getElementById('max_tokens').value = '{n}'; document.getElementById('input').focus()")
            for text, want in (("你好", first), ("类型#裙*颜色#蓝色", second)):
                browser.call("Input.insertText", text=text)                       # typed into the box
                browser.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter",
                             windowsVirtualKeyCode=13, text="\r")
                browser.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter",
                             windowsVirtualKeyCode=13)
                browser.wait("(() => { const a = document.querySelectorAll('.assistant'); "
                             "return a.length && a[a.length - 1].dataset.done === '1'; })()")
                got = browser.js("[...document.querySelectorAll('.assistant')].pop().textContent")
                assert got == want
            assert browser.js("document.querySelectorAll('.user').length") == 2
            shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
            assert shot.startswith(b"\x89PNG\r\n\x1a\n")
            if os.environ.get("GLM_UPDATE_SCREENSHOTS") == "1":
                (ROOT / "docs").mkdir(exist_ok=True)
                (ROOT / "docs" / "serve_chat.png").write_bytes(shot)
            else:
                (tmp_path / "serve_chat.png").write_bytes(shot)
            browser.js("document.getElementById('clear').click()")
            assert browser.js("document.querySelectorAll('.msg').length") == 0
        finally:
            browser.close()
