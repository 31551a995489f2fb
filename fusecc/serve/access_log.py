"""One log line and one counter sample per HTTP request, when its response is complete (ASGI middleware).

    POST /v1/completions 200 41.2ms prompt_tokens=5 completion_tokens=16
    POST /v1/completions 499 880.0ms aborted (client disconnected) prompt_tokens=5 completion_tokens=181
    POST /v1/completions 503 512.3ms aborted (server shutting down) prompt_tokens=4 completion_tokens=9

A stream's status line said 200 before it was cut short; what matters to an operator is who ended
it, so code that ends a request early records it with `mark_aborted` and the line and the counter
show 499 (nginx's "client closed request") or 503 (the server ended it), not the 200.
Handlers fill `scope["fusecc.usage"]` with token counts for the line.
"""

from __future__ import annotations

import logging
import time

from fusecc.serve.metrics import ServerMetrics

logger = logging.getLogger("fusecc.serve")

CLIENT_CLOSED = 499
SERVER_ENDED = 503
_ABORTED = "fusecc.aborted"


def mark_aborted(scope, status: int, reason: str) -> None:
    scope.setdefault(_ABORTED, (status, reason))  # the first cause wins


class AccessLog:
    def __init__(self, app, metrics: ServerMetrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [None]
        usage = scope["fusecc.usage"] = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # the error middleware outside answers 500
            status[0] = status[0] or 500
            raise
        finally:
            code, note = status[0] or CLIENT_CLOSED, ""  # no response at all: the client left first
            if _ABORTED in scope:
                code, reason = scope[_ABORTED]
                note = f" aborted ({reason})"
            ms = (time.perf_counter() - start) * 1e3
            tokens = "".join(f" {k}={v}" for k, v in usage.items())
            logger.info("%s %s %d %.1fms%s%s", scope["method"], scope["path"], code, ms, note, tokens)
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.count_http(scope["method"], route, code)
