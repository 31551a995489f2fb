"""uvicorn's h11 protocol with a bound on how long a client may take to send a request's head.

    config = uvicorn.Config(app, http=protocol_class(read_timeout=30.0), ...)

uvicorn has no header timeout: its keep-alive timer is armed only after a response and is
cancelled by any byte received, so a connection that sends nothing, or a header line every few
seconds, is held forever (a handful of such clients exhaust file descriptors). Here a timer runs
from the moment the connection is made, and again after every response, until the next request's
head is complete; the body is the app's to bound once it has the request (app.py reads it under
the same timeout). When the timer fires with a partial request buffered, the client gets a 408;
an idle connection is just closed.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_class(read_timeout: float) -> type[H11Protocol]:
    return type("TimedH11Protocol", (_TimedH11Protocol,), {"read_timeout": read_timeout})


class _TimedH11Protocol(H11Protocol):
    read_timeout: float = 30.0
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_timer()
        super().connection_lost(exc)

    def _arm_read_timer(self) -> None:
        self._disarm_read_timer()
        if not self.transport.is_closing():
            self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served: the app bounds its body read and the response is its own
        partial_head = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if partial_head:
            # h11 cannot send a response before it has parsed a request: write it directly
            body = json.dumps({"error": {
                "message": f"the request head was not complete after {self.read_timeout:g} s",
                "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()
