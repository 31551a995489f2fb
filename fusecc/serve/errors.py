"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

    raise APIError(400, "max_tokens must be >= 1", param="max_tokens")
    raise APIError.from_value_error(exc)       # SamplingParams' "SamplingParams.top_p must be ..." -> param top_p

Handlers raise APIError; app.py turns it into a JSONResponse (or an SSE error event once a
stream has started).
"""

from __future__ import annotations

import json
import re

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from fusecc.serve.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}
# SamplingParams / EngineConfig raise "SamplingParams.<field> must ..., got ...".
_FIELD_RE = re.compile(r"^\w+\.(\w+) ")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=_TYPES.get(self.status, "api_error"), param=self.param,
                         code=self.code)
        return ErrorResponse(error=info).model_dump()

    def sse(self) -> str:
        """The error as the last event of a stream, then [DONE] (what vLLM sends)."""
        return f"data: {json.dumps(self.body(), separators=(',', ':'))}\n\ndata: [DONE]\n\n"

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_value_error(cls, exc: ValueError, default_param: str | None = None) -> "APIError":
        m = _FIELD_RE.match(str(exc))
        return cls(400, str(exc), param=m.group(1) if m else default_param)

    @classmethod
    def from_validation_error(cls, exc: ValidationError, body: bytes = b"") -> "APIError":
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            huge = _huge_integer(body)
            if huge is not None:  # valid JSON, but a number no parser here will hold
                path, digits = huge
                return cls(400, f"{path}: an integer of {digits} digits is out of range", param=path.split(".")[0],
                           code="int_too_large")
            return cls(400, f"request body is not valid JSON: {err['msg']}", code="invalid_json")
        # loc is ("max_tokens",) or ("messages", 0, "role") or, through a union, ("prompt", "str"):
        # the field is the top-level name; the full path goes in the message.
        loc = err["loc"]
        field = str(loc[0]) if loc else None
        where = ".".join(str(p) for p in loc) or "body"
        return cls(400, f"{where}: {err['msg']}", param=field, code=err["type"])


class _HugeInt(str):
    pass


def _huge_integer(body: bytes) -> tuple[str, int] | None:
    """(dotted path, digit count) of the first integer in `body` too long for int() (> 4300 digits,
    the limit the JSON parser shares), when the body is otherwise valid JSON."""
    def parse_int(text: str):
        try:
            return int(text)
        except ValueError:
            return _HugeInt(text)

    try:
        doc = json.loads(body, parse_int=parse_int)
    except (ValueError, RecursionError):
        return None
    stack = [("", doc)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, _HugeInt):
            return path or "body", len(node.lstrip("-"))
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend(reversed([(f"{path}.{k}" if path else str(k), v) for k, v in items]))
    return None
