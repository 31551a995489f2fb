"""The HTTP application: routes, authentication, body limits, admission, one log line per request.

    app = create_app(engine, "fusecc-tiny", api_key=None, max_queue=4096, max_body_bytes=4 << 20)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Everything the app needs is in its arguments or on `app.state` (no module-level state), so two
apps on two fake engines can live in one process.

Order of checks for POST /v1/*: API key (401) -> body size (400) -> JSON and types (400) ->
model name (404) -> prompt/context/sampling checks (400) -> admission (429) -> engine.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fusecc.serve.disconnect import ClientDisconnected, SSEResponse
from fusecc.serve.errors import APIError
from fusecc.serve.metrics import CONTENT_TYPE, ServerMetrics
from fusecc.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from fusecc.serve.serving import RETRY_AFTER_S, OpenAIServing

logger = logging.getLogger("fusecc.serve")

DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_QUEUE = 4096
_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
# nginx's code for "client closed request": what the log and the counter show for a disconnect.
_CLIENT_CLOSED = 499


class _Admission:
    """In-flight request count against max_queue (the server's own queue bound, before the engine's)."""

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
               max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    name = served_model_name or engine.model_name
    app = FastAPI(title="fusecc-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics = ServerMetrics(engine)
    app.state.serving = serving = OpenAIServing(engine, name, metrics)
    app.state.admission = admission = _Admission(max_queue)

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
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(400, f"request body exceeds the limit of {max_body_bytes} bytes",
                               param="body", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def generate(request: Request, model_cls, handler):
        try:
            body = await read_body(request)
        except ClientDisconnect:  # the client left while sending its body
            return Response(status_code=_CLIENT_CLOSED)
        try:
            req = model_cls.model_validate_json(body)
        except ValidationError as exc:
            raise APIError.from_validation_error(exc) from None
        usage = request.scope.get("fusecc.usage", {})  # filled for the access log
        admission.admit()
        released = False
        try:
            result = await handler(req, request, usage)
            if isinstance(result, dict):
                return JSONResponse(result)
            released = True
            return SSEResponse(_release_after(result, admission))
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
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

    app.add_middleware(_Auth, api_key=api_key)
    app.add_middleware(_AccessLog, metrics=metrics)  # outermost: sees 401s too
    return app


async def _release_after(events, admission: _Admission):
    try:
        async for event in events:
            yield event
    finally:
        admission.release()
        await events.aclose()


class _Auth:
    """Requires `Authorization: Bearer <key>` on /v1/* when the server has an API key."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if (self._expected is not None and scope["type"] == "http" and scope["path"].startswith("/v1/")):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self._expected):
                err = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key")
                return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class _AccessLog:
    """One line per request when its response is complete (after the last streamed byte):
    `POST /v1/completions 200 41.2ms prompt_tokens=5 completion_tokens=16`."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [_CLIENT_CLOSED]
        usage = scope["fusecc.usage"] = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # the error middleware outside answers 500; a client that left is a CancelledError
            if status[0] == _CLIENT_CLOSED:
                status[0] = 500
            raise
        finally:
            ms = (time.perf_counter() - start) * 1e3
            tokens = "".join(f" {k}={v}" for k, v in usage.items())
            logger.info("%s %s %d %.1fms%s", scope["method"], scope["path"], status[0], ms, tokens)
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.http_requests.labels(scope["method"], route, str(status[0])).inc()
