"""The chat page in headless Chromium (Debian's ``chromium``, installed by ``make test``), driven over the
DevTools protocol on a pipe, checked as a user sees it: a typed message's answer streams into the page
(part of it is shown while the scheduler is held mid-answer) and ends equal to ``chat()``'s greedy answer;
a second turn carries the history; Stop freezes the answer where it was; Clear empties the page; a wrong
API key is shown as an error. A screenshot is taken (a PNG is checked), and written to
``docs/serve_chat.png`` (shown in the README) only with ``GLM_UPDATE_SCREENSHOTS=1`` (else to the test's
temporary folder). ``.ci/run`` sets ``GLM_REQUIRE_BROWSER=1``: there a missing chromium fails."""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from tests.conftest import ROOT
from tests.serve.conftest import serving

CHROMIUM = "/usr/bin/chromium"
REQUIRED = os.environ.get("GLM_REQUIRE_BROWSER") == "1"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM) and not REQUIRED,
                                 reason="needs /usr/bin/chromium (Debian's chromium; make test installs it as root)")]


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


LAST = "[...document.querySelectorAll('.assistant')].pop()"
DONE = f"(() => {{ const a = {LAST}; return a && a.dataset.done === '1'; }})()"


class Gate:
    """Holds the scheduler at a step boundary (its test hook) while ``closed`` and a row is active: the
    page is then looked at mid-answer, whatever the machine's speed."""

    def __init__(self, sched):
        self.open = threading.Event()
        self.open.set()
        sched.at_step_boundary = self

    def __call__(self, s):
        if any(len(job.ids) >= 4 for job in s.active.values()):      # a few tokens of an answer out
            self.open.wait(300)


def _type(browser, text):
    browser.call("Input.insertText", text=text)                       # typed into the box, then Enter
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13,
                 text="\r")
    browser.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)


def _partial(browser):
    """The answer's text once some of it is on the page (the scheduler being held, it is not finished)."""
    browser.wait(f"(() => {{ const a = {LAST}; return a && a.textContent.length > 0; }})()")
    assert browser.js(f"{LAST}.dataset.done") is None
    return browser.js(f"{LAST}.textContent")


def test_page_streams_an_answer_stop_and_clear(torch_backend, tmp_path):
    b = torch_backend
    n = 20
    first, hist = b.model.chat(b.tokenizer, "你好", max_new_tokens=n, do_sample=False)
    second, _ = b.model.chat(b.tokenizer, "类型#裙*颜色#蓝色", hist, max_new_tokens=n, do_sample=False)
    with serving(b) as (url, sched):
        gate = Gate(sched)
        browser = DevTools()
        try:
            browser.open(url + "/")
            browser.wait("document.readyState === 'complete' && document.getElementById('model').textContent.length > 0")
            assert b.model_id in browser.js("document.getElementById('model').textContent")
            browser.js(f"document.getElementById('temperature').value = '0'; "
                       f"document.getElementById('max_tokens').value = '{n}'; document.getElementById('input').focus()")
            for text, want in (("你好", first), ("类型#裙*颜色#蓝色", second)):
                gate.open.clear()
                _type(browser, text)
                part = _partial(browser)                 # streamed: part of the answer is shown before the rest
                assert want.startswith(part) and part != want, (part, want)
                assert browser.js("document.getElementById('stop').disabled") is False
                gate.open.set()
                browser.wait(DONE)
                assert browser.js(f"{LAST}.textContent") == want
            assert browser.js("document.querySelectorAll('.user').length") == 2
            assert browser.js("document.querySelectorAll('.error').length") == 0
            shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
            assert shot.startswith(b"\x89PNG\r\n\x1a\n")
            if os.environ.get("GLM_UPDATE_SCREENSHOTS") == "1":
                (ROOT / "docs").mkdir(exist_ok=True)
                (ROOT / "docs" / "serve_chat.png").write_bytes(shot)
            else:
                (tmp_path / "serve_chat.png").write_bytes(shot)
            # Stop: the answer stays as it was when clicked, the box is usable again, the row is freed
            gate.open.clear()
            _type(browser, "讲个笑话")
            _partial(browser)
            shown = browser.js(f"(() => {{ const t = {LAST}.textContent; document.getElementById('stop').click(); "
                               f"return t; }})()")                    # what was shown when Stop was clicked
            browser.wait(DONE)
            gate.open.set()
            assert browser.js(f"{LAST}.textContent") == shown
            assert browser.js("document.getElementById('send').disabled") is False
            assert browser.js("document.getElementById('input').disabled") is False
            assert browser.js("document.querySelectorAll('.error').length") == 0     # stopping is no error
            deadline = time.monotonic() + 120                # a bound on the wait: freed at the next turn
            while sched.stats()["active"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sched.stats()["active"] == 0 and sched.abandoned == 1, sched.stats()
            # Clear: nothing left on the page
            browser.js("document.getElementById('clear').click()")
            assert browser.js("document.querySelectorAll('.msg').length") == 0
        finally:
            gate.open.set()
            browser.close()


def test_a_wrong_api_key_is_shown_as_an_error(torch_backend):
    b = torch_backend
    with serving(b, api_key="sekrit") as (url, _):
        browser = DevTools()
        try:
            browser.open(url + "/")
            browser.wait("document.readyState === 'complete'")
            browser.js("document.getElementById('key').value = 'wrong'; document.getElementById('input').focus()")
            _type(browser, "你好")
            browser.wait("document.querySelectorAll('.error').length > 0")
            err = browser.js("document.querySelector('.error').textContent")
            assert "API key" in err, err
            # no answer shown (the page removes the empty answer bubble of a failed request)
            assert browser.js("[...document.querySelectorAll('.assistant')].map(e => e.textContent).join('')") == ""
            # the right key: the page names the model
            browser.js("const k = document.getElementById('key'); k.value = 'sekrit'; "
                       "k.dispatchEvent(new Event('change'))")
            browser.wait("document.getElementById('model').textContent.length > 0")
            assert b.model_id in browser.js("document.getElementById('model').textContent")
        finally:
            browser.close()


def _enter(browser):
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13, text="\r")
    browser.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)


def test_page_key_hint_ime_errors_trimming_and_layout(torch_backend):
    """A visible hint while a key is needed; Enter that confirms an IME composition does not send; an
    error leaves no empty answer bubble; a history that no longer fits loses its oldest rounds (with a
    note) and the answer is ``chat()``'s over the rounds kept; the input stays at the bottom of the window."""
    from glm_common.prompt import build_prompt
    b = torch_backend
    n = 8
    rounds = [("类型#裙*颜色#蓝色" * (i + 3), "这条蓝色裙子很好看" * (i + 3)) for i in range(4)]
    query = "讲个笑话"
    fits = lambda k: len(b.tokenizer.encode(build_prompt(query, rounds[k:]))) + n <= b.seq_length  # noqa: E731
    keep = next(k for k in range(len(rounds) + 1) if fits(k))
    assert 0 < keep < len(rounds)                      # some rounds must go, some stay
    want = b.model.chat(b.tokenizer, query, rounds[keep:], max_new_tokens=n, do_sample=False)[0]
    with serving(b, api_key="sekrit") as (url, sched):
        browser = DevTools()
        try:
            browser.open(url + "/")
            browser.wait("document.readyState === 'complete' && !document.getElementById('keyhint').hidden")
            browser.js("localStorage.clear(); const k = document.getElementById('key'); k.value = 'sekrit'; "
                       "k.dispatchEvent(new Event('change'))")
            browser.wait("document.getElementById('keyhint').hidden && document.getElementById('model').textContent.length > 0")
            browser.js(f"document.getElementById('temperature').value = '0'; "
                       f"document.getElementById('max_tokens').value = '{n}'; document.getElementById('input').focus()")
            # Enter while an IME composes (Chinese input) confirms the composition: nothing is sent
            browser.js("const i = document.getElementById('input'); i.value = '你好'; i.dispatchEvent(new KeyboardEvent("
                       "'keydown', {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true, cancelable: true}))")
            assert browser.js("document.querySelectorAll('.user').length") == 0
            assert browser.js("document.getElementById('input').value") == "你好"
            # an error (max_tokens over the server's limit): an error line, no empty answer bubble
            browser.js("document.getElementById('max_tokens').value = '5000'")
            _enter(browser)
            browser.wait("document.querySelectorAll('.error').length === 1 && !document.getElementById('send').disabled")
            assert "max_tokens: 5000 is more than this server's limit" in browser.js(
                "document.querySelector('.error').textContent")
            assert browser.js("document.querySelectorAll('.assistant').length") == 0
            # a long history: the oldest rounds are left out, with a note
            history = [m for u, a in rounds for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
            browser.js(f"history = {json.dumps(history, ensure_ascii=False)}; "
                       f"document.getElementById('max_tokens').value = '{n}'; document.getElementById('input').focus()")
            browser.call("Input.insertText", text=query)
            _enter(browser)
            browser.wait("(() => { const a = document.querySelectorAll('.assistant'); "
                         "return a.length && a[a.length - 1].dataset.done === '1'; })()")
            assert browser.js("[...document.querySelectorAll('.assistant')].pop().textContent") == want
            note = browser.js("document.querySelector('.note').textContent")
            assert note.startswith(f"(the {keep} oldest round" if keep > 1 else "(the oldest round")
            assert browser.js("history.length") == 2 * (len(rounds) - keep) + 2
            for _ in range(12):                          # enough messages to overflow the window
                browser.js("bubble('user', 'x\\n'.repeat(5))")
            assert browser.js("Math.abs(document.getElementById('form').getBoundingClientRect().bottom - "
                              "window.innerHeight) <= 1")
            assert browser.js("document.getElementById('log').scrollHeight > document.getElementById('log').clientHeight")
        finally:
            browser.close()
