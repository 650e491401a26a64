"""The HTTP server: FastAPI routes over a :class:`glm_serve.scheduler.Scheduler`, served by uvicorn.

Routes: ``GET /health`` (no key needed), ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (both with ``stream``: server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``), and ``GET /`` (the chat page, static HTML and JS; it sends the key typed into it).
Every other route needs ``Authorization: Bearer <key>`` when the server has an ``--api-key``.
Request bodies over ``max_body_bytes`` are refused with 413 before they are read whole.
Built on FastAPI/Starlette and uvicorn (no hand-written HTTP).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import pathlib
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm_serve.protocol import APIError, chunk, error_body, parse_chat, parse_completion, response
from glm_serve.scheduler import Scheduler

__all__ = ["create_app"]

STATIC = pathlib.Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/health", "/", "/index.html")


class _Guard:
    """ASGI middleware: Bearer key on every route but :data:`OPEN_PATHS`, and the body size limit."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

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
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reply(send, 413, too_big)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooBig()
            return message

        try:
            return await self.app(scope, counted, send)
        except _TooBig:
            return await self._reply(send, 413, too_big)


class _TooBig(Exception):
    pass


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def create_app(scheduler: Scheduler, model_id: str, backend: str = "", api_key: Optional[str] = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app; ``scheduler`` must be started by the caller."""
    app = FastAPI(title="glm2-serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}",
                                       "invalid_request_error", None, kind), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend, "model": model_id, **scheduler.stats()}

    @app.get("/", response_class=HTMLResponse)
    @app.get("/index.html", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    def _model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "glm2-ascend"}

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
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None

    async def _serve(req, request: Request):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        job = scheduler.prepare(req, emit)
        scheduler.submit(job)
        if not req.stream:
            parts = []
            try:
                while True:
                    event = await queue.get()
                    if event[0] == "text":
                        parts.append(event[1])
                    elif event[0] == "done":
                        return response(req, "".join(parts), event[1], event[2])
                    else:
                        raise APIError(500, event[1], "server_error")
            finally:
                scheduler.cancel(job)

        async def events():
            stamp = int(time.time())
            first = True
            try:
                if req.chat:
                    yield _sse(chunk(req, stamp, "", first=True))
                    first = False
                while True:
                    event = await queue.get()
                    if event[0] == "text":
                        yield _sse(chunk(req, stamp, event[1], first=first))
                        first = False
                    elif event[0] == "done":
                        yield _sse(chunk(req, stamp, finish=event[1]))
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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(parse_chat(await _body(request), model_id), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(parse_completion(await _body(request), model_id), request)

    return _Guard(app, api_key, max_body_bytes)
