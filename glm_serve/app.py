"""The HTTP server: FastAPI routes over a :class:`glm_serve.scheduler.Scheduler`, served by uvicorn.

Routes: ``GET /health`` (no key needed), ``GET /v1/models`` (with vLLM's ``max_model_len``: the model's
``seq_length``), ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``: server-sent
events in OpenAI's chunk format, ending with ``data: [DONE]``), vLLM's ``POST /tokenize`` (``prompt`` or
``messages``) and ``POST /detokenize`` (``tokens``), ``GET /metrics`` (Prometheus, see
:mod:`glm_serve.metrics`), and ``GET /`` (the chat page, static HTML and JS; it
sends the key typed into it). Every other route needs ``Authorization: Bearer <key>`` when the server has
an ``--api-key``. ``allow_origins``: browser origins allowed to call the API (CORS, Starlette's
``CORSMiddleware``, preflights answered without a key).

Every request body is read here before a route sees it, ``Content-Length`` or chunked alike: over
``max_body_bytes`` is a 413 (and the connection closes), slower than ``body_timeout`` between two
pieces a 408. Malformed JSON, JSON nested too deep, and text that is not valid Unicode (a lone
surrogate such as ``"\\ud800"``) are 400s; any other failure is a JSON 500, and a keep-alive connection
stays usable after every error that was answered whole. A client that hangs up (streaming or not)
frees its batch row before the next decode step. The connection handling is uvicorn's (its keep-alive
timeout ``timeout_keep_alive`` and connection limit ``limit_concurrency``); :func:`server_config` adds
the one thing uvicorn lacks, a deadline for a request's headers (a connection still sending its
request line and headers after ``header_timeout`` seconds is closed).
Built on FastAPI/Starlette and uvicorn (no hand-written HTTP).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import pathlib
import time
from typing import Optional

import h11
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from glm_serve.protocol import (APIError, chunk, conversation, error_body, parse_chat, parse_completion,
                                response)
from glm_serve.scheduler import Scheduler

__all__ = ["create_app", "server_config"]

log = logging.getLogger("glm_serve")
STATIC = pathlib.Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/health", "/", "/index.html")


class _Guard:
    """ASGI middleware: Bearer key on every route but :data:`OPEN_PATHS`, the body read whole (size and
    time limits), and a JSON 500 for anything a route did not answer."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, body_timeout: float):
        self.app, self.api_key, self.max_body_bytes, self.body_timeout = app, api_key, max_body_bytes, body_timeout

    async def _reply(self, send, status: int, body: dict, headers=()):
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()), *headers]})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await self._reply(send, 401, error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)",
                    "invalid_request_error", None, "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        limit = self.max_body_bytes
        too_big = error_body(f"request body larger than {limit} bytes (--max-body-bytes)",
                             "invalid_request_error", None, "body_too_large")
        close = [(b"connection", b"close")]            # the rest of the body is not read
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reply(send, 413, too_big, close)
        pieces, seen = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                return await self._reply(send, 408, error_body(
                    f"request body not received within {self.body_timeout:g} s", "invalid_request_error", None,
                    "body_timeout"), close)
            if message["type"] == "http.disconnect":
                return
            pieces.append(message.get("body", b""))
            seen += len(pieces[-1])
            if seen > limit:
                return await self._reply(send, 413, too_big, close)
            if not message.get("more_body", False):
                break
        body, given = b"".join(pieces), False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        state = {"started": False, "done": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except Exception as e:                      # noqa: BLE001 - answered as JSON; the connection lives on
            if state["done"]:
                return                              # answered (Starlette's 500 handler re-raises after it)
            if state["started"]:
                raise
            log.error("%s %s failed: %s: %s", scope.get("method"), scope["path"], type(e).__name__, e)
            await self._reply(send, 500, error_body(f"internal error: {type(e).__name__}", "server_error"))


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers
    (``config.header_timeout`` seconds from the connection or the previous response)."""

    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        timeout = getattr(self.config, "header_timeout", None)
        if timeout:
            self._header_timer = self.loop.call_later(timeout, self._expired)

    def _expired(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():   # headers not complete
            self.transport.close()


def server_config(app, host: str, port: int, header_timeout: float = 10.0, keep_alive: int = 5,
                  max_connections: Optional[int] = None):
    """uvicorn's ``Config`` for ``app``: keep-alive timeout, connection limit (``limit_concurrency``:
    uvicorn answers 503 beyond it) and the header deadline."""
    import uvicorn
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=_HeaderTimeoutProtocol,
                            timeout_keep_alive=keep_alive, limit_concurrency=max_connections)
    config.header_timeout = header_timeout
    return config


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def create_app(scheduler: Scheduler, model_id: str, backend: str = "", api_key: Optional[str] = None,
               max_body_bytes: int = 1 << 20, body_timeout: float = 30.0, allow_origins=()) -> FastAPI:
    """The ASGI app; ``scheduler`` must be started by the caller."""
    app = FastAPI(title="glm2-serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}",
                                       "invalid_request_error", None, kind), status_code=exc.status_code)

    from glm_serve.metrics import CONTENT_TYPE_LATEST, Metrics
    metrics = Metrics(scheduler)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend, "model": model_id, **scheduler.stats()}

    @app.get("/", response_class=HTMLResponse)
    @app.get("/index.html", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    def _model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "glm2-ascend",
                "max_model_len": scheduler.seq_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"model: {name!r} is not served here (this server serves {model_id!r})",
                           param="model", code="model_not_found")
        return _model_card()

    async def _body(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None
        except RecursionError:
            raise APIError(400, "malformed JSON body: nested too deep") from None
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start:e.end].encode("unicode_escape").decode()
            raise APIError(400, f"request body: invalid text: {bad} is a lone UTF-16 surrogate, not a character") \
                from None
        return body

    async def _gone(request: Request) -> None:
        """Returns when the client has hung up."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _serve(req, request: Request):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        job = scheduler.prepare(req, emit)
        scheduler.submit(job)
        if not req.stream:
            parts, entries = [], []
            gone = asyncio.ensure_future(_gone(request))
            try:
                while True:
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():             # the client went away: its row is freed below
                        getter.cancel()
                        return Response(status_code=499)
                    event = getter.result()
                    if event[0] == "text":
                        parts.append(event[1])
                        entries += event[2]
                    elif event[0] == "done":
                        return response(req, "".join(parts), event[1], event[2], entries + event[3])
                    else:
                        raise APIError(500, event[1], "server_error")
            finally:
                gone.cancel()
                scheduler.cancel(job)

        async def events():
            stamp = int(time.time())
            first, offset = True, 0
            try:
                if req.chat:
                    yield _sse(chunk(req, stamp, "", first=True))
                    first = False
                while True:
                    event = await queue.get()
                    if event[0] == "text":
                        yield _sse(chunk(req, stamp, event[1], first=first, entries=event[2], offset=offset))
                        first = False
                        offset += sum(len(e[0]) for e in event[2])
                    elif event[0] == "done":
                        yield _sse(chunk(req, stamp, finish=event[1], entries=event[3], offset=offset))
                        if req.include_usage:
                            yield _sse(chunk(req, stamp, use=event[2]))
                        break
                    else:
                        yield _sse(error_body(event[1], "server_error"))
                        break
                yield "data: [DONE]\n\n"
            finally:
                scheduler.cancel(job)     # a client that went away frees its row now

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _body(request)
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise APIError(400, "request body: give either prompt (a string) or messages", param="prompt")
        model = body.get("model")
        if model is not None and model not in (model_id, ""):
            raise APIError(404, f"model: {model!r} is not served here (this server serves {model_id!r})",
                           param="model", code="model_not_found")
        if "messages" in body:
            from glm_common.prompt import build_prompt
            text = build_prompt(*conversation(body["messages"]))
        elif isinstance(body["prompt"], str):
            text = body["prompt"]
        else:
            raise APIError(400, "prompt: expected a string", param="prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise APIError(400, f"add_special_tokens: expected true or false, got {special!r}",
                           param="add_special_tokens")
        tokens = list(scheduler.tokenizer.encode(text, add_special_tokens=special))
        return {"count": len(tokens), "max_model_len": scheduler.seq_length, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        size = len(scheduler.tokenizer)
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise APIError(400, "tokens: expected a list of token ids", param="tokens")
        bad = [t for t in tokens if not 0 <= t < size]
        if bad:
            raise APIError(400, f"tokens: {bad[0]} is not a token id (the vocabulary has {size})", param="tokens")
        return {"prompt": scheduler.tokenizer.decode(tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(parse_chat(await _body(request), model_id), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(parse_completion(await _body(request), model_id), request)

    guarded = _Guard(app, api_key, max_body_bytes, body_timeout)
    if not allow_origins:
        return guarded
    from starlette.middleware.cors import CORSMiddleware
    return CORSMiddleware(guarded, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                          allow_headers=["authorization", "content-type"], max_age=600)
