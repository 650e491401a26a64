"""The request loop: a bounded waiting queue in front of a backend's ``BatchDecoder``.

One thread owns the decoder. Each turn it drops abandoned requests (their rows are freed before the
next decode step), admits waiting requests while rows are free (their prompt is prefilled and their
first token chosen), runs one decode step for every active row, and hands each request its new text
through the request's ``emit`` callback: ``("text", delta, entries)``, then ``("done", finish_reason,
usage, entries)``, or ``("error", message)``; ``entries`` are the log-probabilities of the tokens not yet
reported (``[(token, bytes, logprob, [(token, bytes, logprob)])]``, empty unless the request asked). A request whose prefill or token choice fails gets the error alone; the
other rows decode on (only a failed batch forward fails every row).

``max_queue`` counts the requests that really wait: those beyond the free rows (rows being filled
this turn count as taken). ``max_queue=0``: a request is taken only when a row is free. ``finish_reason`` is ``"stop"`` (end-of-sequence token or a stop string) or
``"length"`` (``max_tokens`` reached). ``usage`` counts prompt tokens (special tokens included) and
the answer's tokens (the end-of-sequence token not included).
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from typing import Callable, Optional

from glm_serve.protocol import APIError, ChatRequest, usage
from glm_serve.text import TextStream

__all__ = ["Job", "Scheduler"]

log = logging.getLogger("glm_serve")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Job:
    """One request on its way through the scheduler."""

    def __init__(self, req: ChatRequest, prompt_ids: list, max_tokens: int, emit: Callable):
        self.req, self.prompt_ids, self.max_tokens, self.emit = req, prompt_ids, max_tokens, emit
        self.ids: list = []
        self.entries: list = []        # log-probabilities not yet reported
        self.submitted, self.last = time.monotonic(), None     # for the metrics
        self.text = TextStream(chat=req.chat, stop=req.stop)
        self.cancelled = False
        self.finished = False


class Scheduler:
    """``decoder``: a ``BatchDecoder`` of either backend; ``settings_cls``: that backend's
    ``SamplingSettings``; ``seq_length``: the model's context (prompt + answer); ``max_queue``: requests
    that may wait for a row (more are refused with 503); ``max_tokens_limit``: the largest ``max_tokens``
    a request may ask for (and the default when it asks for none, bounded by ``seq_length``)."""

    def __init__(self, decoder, tokenizer, settings_cls, seq_length: int, eos_ids, max_queue: int = 64,
                 max_tokens_limit: int = 2048):
        self.decoder, self.tokenizer, self.settings_cls = decoder, tokenizer, settings_cls
        self.seq_length = int(seq_length)
        self.eos_ids = set(eos_ids)
        self.max_queue, self.max_tokens_limit = int(max_queue), int(max_tokens_limit)
        self.waiting: deque = deque()
        self.active: dict = {}
        self.cond = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.stopping = False
        self.steps = 0
        self.admitting = 0             # jobs taken off ``waiting`` whose prefill is under way
        self.observer = None           # glm_serve.metrics.Metrics (or anything with its methods)
        self.abandoned = 0             # rows freed because their client went away
        # called at each step boundary (before waiting requests are admitted) with the scheduler; it may
        # block to hold the loop there. None in production; the tests use it to order requests by steps.
        self.at_step_boundary: Optional[Callable[["Scheduler"], None]] = None

    # ------------------------------------------------------------------ requests
    def prepare(self, req: ChatRequest, emit: Callable) -> Job:
        """Tokenize and check the lengths; raises :class:`APIError` (400) naming both numbers."""
        ids = list(self.tokenizer.encode(req.prompt))
        n, limit = len(ids), self.seq_length
        if n >= limit:
            raise APIError(400, f"the prompt has {n} tokens; the model's seq_length is {limit} (prompt and "
                                f"answer together), so at most {limit - 1} prompt tokens fit",
                           param="messages" if req.chat else "prompt", code="context_length_exceeded")
        room = limit - n
        if req.max_tokens is None:
            max_tokens = min(self.max_tokens_limit, room)
        else:
            max_tokens = req.max_tokens
            if max_tokens > self.max_tokens_limit:
                raise APIError(400, f"max_tokens: {max_tokens} is more than this server's limit "
                                    f"{self.max_tokens_limit} (--max-tokens); refused", param="max_tokens")
            if max_tokens > room:
                raise APIError(400, f"max_tokens: {max_tokens} does not fit: the prompt has {n} tokens and "
                                    f"the model's seq_length is {limit}, so at most {room}; refused",
                               param="max_tokens", code="context_length_exceeded")
        return Job(req, ids, max_tokens, emit)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`APIError` 503 when the queue is full."""
        with self.cond:
            free = self.decoder.max_batch - len(self.active) - self.admitting
            waits = len(self.waiting) - max(free, 0)          # already waiting beyond the free rows
            if waits + 1 > self.max_queue:
                if self.observer is not None:
                    self.observer.ended("refused", len(job.prompt_ids), 0, 0.0)
                raise APIError(503, f"the server is busy: {self.decoder.max_batch} rows decode and {max(waits, 0)} "
                                    f"requests are already waiting (--max-queue {self.max_queue}); retry later",
                               type_="server_error", code="queue_full", headers={"Retry-After": "1"})
            job.submitted = time.monotonic()
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: free its row before the next decode step."""
        with self.cond:
            if not job.finished:
                job.cancelled = True
                self.cond.notify()

    def stats(self) -> dict:
        return {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.decoder.max_batch,
                "max_queue": self.max_queue, "decode_steps": self.steps, "abandoned": self.abandoned}

    # ------------------------------------------------------------------ the loop
    def start(self) -> "Scheduler":
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="glm-serve-scheduler", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            if self.at_step_boundary is not None:
                self.at_step_boundary(self)
            with self.cond:
                for key, job in list(self.active.items()):
                    if job.cancelled:
                        self._drop(job)
                        self.abandoned += 1
                        self._ended(job, "abandoned")
                for job in [j for j in self.waiting if j.cancelled]:
                    self.waiting.remove(job)
                    job.finished = True
                    self._ended(job, "abandoned")
                admit = []
                while self.waiting and self.decoder.free - len(admit) > 0:
                    admit.append(self.waiting.popleft())
                self.admitting = len(admit)
                if self.stopping:
                    return
                if not self.active and not admit:
                    self.cond.wait()
                    continue
            for job in admit:
                try:
                    r = job.req
                    echo = self._echo_entries(job) if r.echo else None
                    first = None
                    if job.max_tokens > 0:
                        settings = self.settings_cls(do_sample=r.do_sample, temperature=r.temperature or 1.0,
                                                     top_p=r.top_p, top_k=r.top_k, seed=r.seed,
                                                     repetition_penalty=r.repetition_penalty,
                                                     presence_penalty=r.presence_penalty,
                                                     frequency_penalty=r.frequency_penalty, logprobs=r.logprobs)
                        first = self.decoder.add(id(job), job.prompt_ids, settings, job.max_tokens)
                        self.active[id(job)] = job
                except Exception as e:                       # noqa: BLE001 - reported to the client
                    log.error("prefill failed: %s: %s", type(e).__name__, e)
                    job.finished = True
                    self._ended(job, "error")
                    job.emit(("error", f"prefill failed: {type(e).__name__}: {e}"))
                    continue
                finally:
                    with self.cond:
                        self.admitting -= 1
                if echo is not None:
                    job.emit(("text", job.req.prompt, echo))
                if first is None:                          # max_tokens 0 (echo): the prompt scored, no answer
                    self._finish(job, "length", flushed=True)
                    continue
                self._token(job, first)
            if not self.active:
                continue
            try:
                new = self.decoder.step()
                self.steps += 1
            except Exception as e:                           # noqa: BLE001
                log.exception("decode step failed")
                for job in list(self.active.values()):
                    self._drop(job)
                    self._ended(job, "error")
                    job.emit(("error", f"decode failed: {type(e).__name__}: {e}"))
                continue
            for key, tok in new.items():
                job = self.active.get(key)
                if job is None:
                    continue
                if isinstance(tok, BaseException):          # this row's token choice failed: it alone ends
                    log.error("decode failed for one row: %s: %s", type(tok).__name__, tok)
                    self._drop(job)
                    self._ended(job, "error")
                    job.emit(("error", f"decode failed: {type(tok).__name__}: {tok}"))
                    continue
                self._token(job, tok)

    def _echo_entries(self, job: Job) -> list:
        """The log-probability entries of the prompt's tokens for ``echo`` (none unless ``logprobs``)."""
        if job.req.logprobs is None:
            return []
        out = []
        for tok, lp in zip(job.prompt_ids, self.decoder.prompt_logprobs(job.prompt_ids, job.req.logprobs)):
            text, raw = self._token_text(tok)
            out.append((text, raw, None, None) if lp is None else
                       (text, raw, lp[0], [(*self._token_text(t), v) for t, v in lp[1]]))
        return out

    def _drop(self, job: Job) -> None:
        self.active.pop(id(job), None)
        self.decoder.remove(id(job))
        job.finished = True

    def _token(self, job: Job, tok: int) -> None:
        if job.cancelled:
            self._drop(job)
            self.abandoned += 1
            self._ended(job, "abandoned")
            return
        if self.observer is not None:
            now = time.monotonic()
            if job.last is None:
                self.observer.first_token(now - job.submitted)
            else:
                self.observer.token_gap(now - job.last)
            job.last = now
        if tok in self.eos_ids:
            self._finish(job, "stop")
            return
        job.ids.append(tok)
        if job.req.logprobs is not None:
            lp, top = self.decoder.logprobs(id(job))
            job.entries.append((*self._token_text(tok), lp, [(*self._token_text(t), v) for t, v in top]))
        final = len(job.ids) >= job.max_tokens
        delta = job.text.delta(self.tokenizer.decode(job.ids), final)
        if delta:
            job.emit(("text", delta, self._take(job)))
        if job.text.stopped:
            self._finish(job, "stop", flushed=True)
        elif final:
            self._finish(job, "length", flushed=True)

    def _finish(self, job: Job, reason: str, flushed: bool = False) -> None:
        if not flushed:
            delta = job.text.delta(self.tokenizer.decode(job.ids), final=True)
            if delta:
                job.emit(("text", delta, self._take(job)))
        self._drop(job)
        self._ended(job, reason)
        job.emit(("done", reason, usage(len(job.prompt_ids), len(job.ids)), self._take(job)))

    def _ended(self, job: Job, outcome: str) -> None:
        if self.observer is not None:
            self.observer.ended(outcome, len(job.prompt_ids), len(job.ids), time.monotonic() - job.submitted)

    @staticmethod
    def _take(job: Job) -> list:
        out, job.entries = job.entries, []
        return out

    def _token_text(self, tok: int):
        """``(token text, its UTF-8 bytes)``: the sentencepiece piece with its word-start mark as a space;
        a byte-fallback piece ``<0xE4>`` is ``("bytes:\\xe4", [228])`` as OpenAI writes a token that is not a
        whole character."""
        piece = self.tokenizer.convert_id_to_token(tok)
        m = _BYTE_PIECE.fullmatch(piece or "")
        if m:
            return f"bytes:\\x{m.group(1).lower()}", [int(m.group(1), 16)]
        text = (piece or "").replace("\u2581", " ")           # sentencepiece's word-start mark is a space
        return text, list(text.encode("utf-8", "replace"))
