"""The OpenAI wire format: request checking, ChatGLM2's prompt from ``messages``, responses, chunks, errors.

Request bodies are read as plain JSON and checked here field by field, so every mistake is answered
in OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``) with a message naming the
field. Sampling: ``temperature``, ``top_p``, ``seed``, ``presence_penalty`` and ``frequency_penalty``
(OpenAI's, over the answer), and vLLM's extensions ``top_k`` (0 or -1: off) and ``repetition_penalty``
(ChatGLM2's ``chat()`` one, over prompt and answer). ``logprobs``/``top_logprobs`` (chat) and
``logprobs: k`` (completions) report the model's own log-probabilities (before penalties and
temperature, as vLLM does). ``echo`` (completions) puts the prompt before the answer; with ``logprobs``
it also reports each prompt token's log-probability given those before it (the first: ``null``), and
with ``max_tokens: 0`` it only scores the prompt, as evaluation harnesses ask. Fields of OpenAI's API that
change what the model would do but that we do not implement (``n`` other than 1, ``echo`` in chat,
``tools``, ``logit_bias``, ``response_format``) are refused
with 400 rather than silently ignored; purely informational ones
(``user``, ``metadata``, ``stream_options`` other than ``include_usage``) are accepted.
``stream_options`` without ``stream: true`` is refused, as OpenAI refuses it.

A ``temperature`` below :data:`TEMPERATURE_FLOOR` (0 included) answers greedily, as vLLM
(``_SAMPLING_EPS``) and llama.cpp do: dividing the scores by a denormal temperature overflows them to
``inf`` and the softmax to NaN.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from glm_common.prompt import build_prompt

__all__ = ["APIError", "ChatRequest", "parse_chat", "parse_completion", "conversation", "error_body",
           "ROLES", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "TEMPERATURE_FLOOR"]

ROLES = ("system", "user", "assistant")
#: ChatGLM2's chat() defaults, used when the request leaves them out.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8
#: temperatures below this answer greedily (vLLM's _SAMPLING_EPS)
TEMPERATURE_FLOOR = 1e-5
_REFUSED = {"n": 1, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
            "logit_bias": None, "response_format": None, "best_of": 1, "echo": False, "suffix": None}
#: most ``top_logprobs`` a chat request may ask for (OpenAI's limit), and ``logprobs`` for completions
MAX_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS = 20, 5


class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ChatRequest:
    """A checked request: the prompt text and how to answer it."""
    prompt: str
    chat: bool                      # chat completion (answer post-processed as chat() does) or raw completion
    stream: bool = False
    max_tokens: Optional[int] = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: Optional[int] = None
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None              # None: no log-probabilities; k: the token's and the top k
    echo: bool = False                          # completions: the prompt comes back before the answer
    stop: list = field(default_factory=list)
    include_usage: bool = False
    model: str = ""
    id: str = ""

    @property
    def do_sample(self) -> bool:
        """Greedy when ``temperature`` is below :data:`TEMPERATURE_FLOOR` (0: OpenAI's convention)."""
        return self.temperature >= TEMPERATURE_FLOOR


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):                                  # content parts: text only
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if c is None and msg.get("role") == "assistant":
        return ""
    raise APIError(400, f"messages[{i}].content: expected a string, got {type(c).__name__}",
                   param=f"messages[{i}].content")


def conversation(messages: Any) -> tuple[str, list]:
    """OpenAI ``messages`` -> ``(query, history)`` for ChatGLM2's round format.

    System messages (only before the first user message) are joined and put, followed by a newline,
    before the first user message (ChatGLM2 has no system role). Then user and assistant messages must
    alternate, starting and ending with a user message; each user/assistant pair is one round.
    """
    if not isinstance(messages, list):
        raise APIError(400, "messages: expected a list of {role, content} objects", param="messages")
    if not messages:
        raise APIError(400, "messages: empty conversation (give at least one user message)", param="messages")
    system, turns = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise APIError(400, f"messages[{i}]: expected an object with role and content", param=f"messages[{i}]")
        role = msg.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})",
                           param=f"messages[{i}].role")
        text = _content(msg, i)
        if role == "system":
            if turns:
                raise APIError(400, f"messages[{i}]: a system message must come before the first user message",
                               param=f"messages[{i}].role")
            system.append(text)
            continue
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if role != want:
            raise APIError(400, f"messages[{i}].role: expected {want} (user and assistant messages alternate, "
                                f"starting with user), got {role}", param=f"messages[{i}].role")
        turns.append(text)
    if not turns:
        raise APIError(400, "messages: empty conversation (only system messages; give a user message)",
                       param="messages")
    if len(turns) % 2 == 0:
        raise APIError(400, f"messages[{len(messages) - 1}].role: the last message must be a user message",
                       param=f"messages[{len(messages) - 1}].role")
    if system:
        turns[0] = "\n".join(system) + "\n" + turns[0]
    history = [(turns[j], turns[j + 1]) for j in range(0, len(turns) - 1, 2)]
    return turns[-1], history


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise APIError(400, f"{name}: expected {'an integer' if integer else 'a number'}, got {v!r}", param=name)
    if not lo <= v <= hi:
        raise APIError(400, f"{name}: {v} is out of range [{lo}, {hi}]", param=name)
    return v


def _common(body: Any, chat: bool, model_id: str) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "request body: expected a JSON object")
    echo = False
    if not chat:
        echo = body.get("echo", False)
        if echo is None:
            echo = False
        if not isinstance(echo, bool):
            raise APIError(400, f"echo: expected true or false, got {echo!r}", param="echo")
    for key, default in _REFUSED.items():
        if key == "echo" and not chat:
            continue
        v = body.get(key)
        if v is None or v is False and (default is None or isinstance(default, bool)):
            continue
        if isinstance(v, bool) or v != default:                  # n: true is not n: 1
            raise APIError(400, f"{key}: not supported by this server (only {default!r})", param=key)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or model not in (model_id, "")):
        raise APIError(404, f"model: {model!r} is not served here (this server serves {model_id!r})",
                       param="model", code="model_not_found")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "stop: expected a string or a list of up to 4 strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream: expected true or false, got {stream!r}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options: expected an object", param="stream_options")
    if body.get("stream_options") is not None and not stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        # 0 only with echo: the prompt scored, nothing generated
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 0 if echo else 1, 2 ** 31, integer=True)
    seed = _number(body, "seed", None, -2 ** 63, 2 ** 64, integer=True)
    repetition = float(_number(body, "repetition_penalty", 1.0, 0, 10))
    if repetition == 0:
        raise APIError(400, "repetition_penalty: must be greater than 0 (1 is none)", param="repetition_penalty")
    top_k = _number(body, "top_k", 0, -1, 2 ** 31, integer=True)
    if chat:
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise APIError(400, f"logprobs: expected true or false, got {want!r}", param="logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not want:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _number(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS, integer=True)
    return dict(chat=chat, stream=stream, max_tokens=max_tokens,
                temperature=float(_number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2)),
                top_p=float(_number(body, "top_p", DEFAULT_TOP_P, 0, 1)),
                seed=None if seed is None else seed % 2 ** 63, stop=stop, top_k=max(top_k, 0),
                repetition_penalty=repetition, logprobs=logprobs, echo=echo,
                presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
                frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
                include_usage=bool(opts.get("include_usage", False)), model=model_id)


def parse_chat(body: Any, model_id: str) -> ChatRequest:
    """``POST /v1/chat/completions`` body -> :class:`ChatRequest` (or :class:`APIError`)."""
    common = _common(body, True, model_id)
    if "messages" not in body:
        raise APIError(400, "messages: required", param="messages")
    query, history = conversation(body["messages"])
    if common["top_p"] == 0:
        raise APIError(400, "top_p: must be greater than 0", param="top_p")
    return ChatRequest(prompt=build_prompt(query, history), id="chatcmpl-" + uuid.uuid4().hex[:24], **common)


def parse_completion(body: Any, model_id: str) -> ChatRequest:
    """``POST /v1/completions`` body -> :class:`ChatRequest` over the raw ``prompt``."""
    common = _common(body, False, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt: expected a string (one prompt per request)", param="prompt")
    if common["top_p"] == 0:
        raise APIError(400, "top_p: must be greater than 0", param="top_p")
    return ChatRequest(prompt=prompt, id="cmpl-" + uuid.uuid4().hex[:24], **common)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_body(req: ChatRequest, entries: Optional[list], offset: int = 0):
    """OpenAI's ``logprobs`` object for ``entries``: ``[(token, bytes, logprob, [(token, bytes, logprob)])]``
    (chat: ``{"content": [...]}``; completions: tokens, token_logprobs, top_logprobs, text_offset from
    ``offset``); ``None`` when the request asked for none."""
    if req.logprobs is None:
        return None
    entries = entries or []
    if req.chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": b, "top_logprobs": [
            {"token": tt, "logprob": tlp, "bytes": tb} for tt, tb, tlp in top]} for t, b, lp, top in entries],
            "refusal": None}
    offsets = []
    for t, _, _, _ in entries:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[2] for e in entries],
            "top_logprobs": [None if e[3] is None else {tt: tlp for tt, _, tlp in e[3]} for e in entries]
            if req.logprobs else None,
            "text_offset": offsets}


def response(req: ChatRequest, text: str, finish: str, use: dict, entries: Optional[list] = None) -> dict:
    base = {"id": req.id, "created": int(time.time()), "model": req.model, "usage": use}
    if req.chat:
        return {**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
             "logprobs": logprobs_body(req, entries)}]}
    return {**base, "object": "text_completion", "choices": [
        {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs_body(req, entries)}]}


def chunk(req: ChatRequest, created: int, text: Optional[str] = None, finish: Optional[str] = None,
          first: bool = False, use: Optional[dict] = None, entries: Optional[list] = None, offset: int = 0) -> dict:
    """One streamed chunk; ``use`` alone gives the final usage chunk (empty ``choices``); ``entries``:
    the log-probabilities of the tokens since the previous chunk."""
    base = {"id": req.id, "created": created, "model": req.model}
    if use is not None:
        return {**base, "object": "chat.completion.chunk" if req.chat else "text_completion",
                "choices": [], "usage": use}
    if req.chat:
        delta = {} if finish else {"content": text or ""}
        if first:
            delta["role"] = "assistant"
        return {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": logprobs_body(req, entries) if entries else None}]}
    return {**base, "object": "text_completion",
            "choices": [{"index": 0, "text": text or "", "finish_reason": finish,
                         "logprobs": logprobs_body(req, entries, offset) if entries else None}]}
