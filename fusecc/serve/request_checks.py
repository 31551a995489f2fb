"""Checks on a request's head, before any route sees it (ASGI middleware).

    app.add_middleware(RequestChecks, api_key="KEY")

- Framing: `Content-Length` together with `Transfer-Encoding` is a 400 that closes the
  connection (RFC 9112 6.1). h11 would pick chunked framing and wait for chunk headers that a
  client sending a Content-Length body never writes, so the request hung; two parsers disagreeing
  on where a body ends is also how requests are smuggled through proxies.
- API key, when the server has one: `Authorization: Bearer <key>` on /v1/*. The scheme is
  case-insensitive (RFC 9110 11.1: `bearer KEY` is the same credential); the key is compared in
  constant time.
"""

from __future__ import annotations

import hmac

from fusecc.serve.errors import APIError


class RequestChecks:
    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self._check(scope)
            if err is not None:
                return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, scope) -> APIError | None:
        headers = scope["headers"]  # lower-cased names (ASGI)
        names = {name for name, _ in headers}
        if b"transfer-encoding" in names and b"content-length" in names:
            return APIError(400, "a request must not carry both Content-Length and Transfer-Encoding",
                            param="Transfer-Encoding", code="bad_framing", headers={"Connection": "close"})
        if self._key is not None and scope["path"].startswith("/v1/"):
            auth = next((value for name, value in headers if name == b"authorization"), b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                                code="invalid_api_key")
        return None
