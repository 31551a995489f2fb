"""The HTTP application: routes, request checks, body limits, admission, one log line per request.

    app = create_app(engine, "fusecc-tiny", api_key=None, max_queue=4096, max_body_bytes=4 << 20)
    app.state.ending.set()     # shutdown deadline: every in-flight request ends with a 503 now

Everything the app needs is in its arguments or on `app.state` (no module-level state), so two
apps on two fake engines can live in one process.

Order of checks for POST /v1/*: framing (400) -> API key (401) -> Content-Type (415) -> body size
and read time (400/408) -> JSON and types (400) -> model name (404) -> prompt/context/sampling
checks (400) -> admission (429) -> engine (its full waiting queue: 429).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fusecc.serve.access_log import CLIENT_CLOSED, SERVER_ENDED, AccessLog, mark_aborted
from fusecc.serve.disconnect import ClientDisconnected, ServerEnding, SSEResponse
from fusecc.serve.errors import APIError
from fusecc.serve.metrics import CONTENT_TYPE, ServerMetrics
from fusecc.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from fusecc.serve.request_checks import RequestChecks
from fusecc.serve.serving import RETRY_AFTER_S, OpenAIServing, shutting_down_error

logger = logging.getLogger("fusecc.serve")

DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_QUEUE = 4096
DEFAULT_READ_TIMEOUT_S = 30.0
_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


class _Admission:
    """HTTP requests in flight in this server against max_queue. The server owns this bound (it
    caps the requests, bodies and response buffers it holds); the engine owns the bound on its
    waiting sequences (max_waiting, SchedulerFullError -> 429 in serving.py). Both answer 429."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.in_flight = 0

    def can_admit(self) -> bool:
        return self.in_flight < self.max_queue

    def admit(self) -> None:
        if not self.can_admit():
            raise APIError(429, f"the server is busy: {self.in_flight} requests in flight "
                                f"(max_queue={self.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": RETRY_AFTER_S})
        self.in_flight += 1

    def release(self) -> None:
        assert self.in_flight > 0
        self.in_flight -= 1


def create_app(engine, served_model_name: str | None = None, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               read_timeout: float = DEFAULT_READ_TIMEOUT_S, **serving_options) -> FastAPI:
    """serving_options: OpenAIServing's keyword arguments (chat_template, default_sampling)."""
    name = served_model_name or engine.model_name
    app = FastAPI(title="fusecc-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics = ServerMetrics(engine)
    app.state.ending = ending = asyncio.Event()
    app.state.serving = serving = OpenAIServing(engine, name, metrics, ending=ending, **serving_options)
    app.state.admission = admission = _Admission(max_queue)
    last_words = shutting_down_error().sse()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception):
        # Starlette's server-error middleware calls this, then re-raises (the traceback is logged)
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}").response()

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(400, f"request body of {declared} bytes exceeds the limit of {max_body_bytes} bytes",
                           param="body", code="request_too_large")
        chunks, size = [], 0
        try:
            # a client trickling its body must not hold the connection (and a slot) forever
            async with asyncio.timeout(read_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_body_bytes:
                        raise APIError(400, f"request body exceeds the limit of {max_body_bytes} bytes",
                                       param="body", code="request_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body was not complete after {read_timeout:g} s ({size} bytes "
                                f"received)", param="body", code="request_timeout",
                           headers={"Connection": "close"}) from None
        return b"".join(chunks)

    async def generate(request: Request, model_cls, handler):
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            # also what keeps a web page from starting generations through a visitor's browser:
            # a cross-origin JSON POST needs a CORS preflight, which this server never grants
            raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'}",
                           param="Content-Type", code="unsupported_media_type")
        try:
            body = await read_body(request)
        except ClientDisconnect:  # the client left while sending its body
            mark_aborted(request.scope, CLIENT_CLOSED, "client disconnected")
            return Response(status_code=CLIENT_CLOSED)
        req = serving.parse(model_cls, body)
        usage = request.scope.get("fusecc.usage", {})  # filled for the access log
        admission.admit()
        released = False
        try:
            result = await handler(req, request, usage)
            if isinstance(result, dict):
                return JSONResponse(result)
            released = True
            return SSEResponse(_release_after(result, admission), ending, last_words)
        except ClientDisconnected:
            mark_aborted(request.scope, CLIENT_CLOSED, "client disconnected")
            return Response(status_code=CLIENT_CLOSED)
        except ServerEnding:
            mark_aborted(request.scope, SERVER_ENDED, "server shutting down")
            return shutting_down_error().response()
        finally:
            if not released:
                admission.release()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest, serving.completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest, serving.chat)

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=name, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/health")
    async def health():
        # 503 once the engine cannot serve (its thread failed, or it was shut down), so that load
        # balancers stop routing here
        check = getattr(engine, "check_health", None)
        if check is not None:
            try:
                check()
            except Exception as exc:
                return APIError(503, f"the engine is not serving: {exc}").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(RequestChecks, api_key=api_key)
    app.add_middleware(AccessLog, metrics=metrics, routes=_ROUTES)  # outermost: sees 400s and 401s too
    return app


async def _release_after(events, admission: _Admission):
    try:
        async for event in events:
            yield event
    finally:
        admission.release()
        await events.aclose()
