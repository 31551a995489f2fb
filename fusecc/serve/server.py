"""The listening socket and the uvicorn server around the app: signals, shutdown deadline, readiness.

    sock = bind_socket("127.0.0.1", 0)         # OSError now, before minutes of engine start-up
    server = Server(config, ending=app.state.ending, shutdown_timeout=10.0, on_ready=log_ready)
    await server.serve(sockets=[sock])

Shutdown (SIGINT/SIGTERM): uvicorn stops accepting and waits for in-flight requests. After
`shutdown_timeout` seconds, or at a second Ctrl-C, `ending` is set and the app answers every
request still running with a 503 (a stream: an error event and [DONE]) and counts it as ended by
the server; uvicorn's own timeout, which cancels tasks and cuts streams, stays only as a backstop
for clients that do not read their responses. A third Ctrl-C exits without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from typing import Callable

import uvicorn

# seconds after the shutdown deadline before uvicorn cancels what is left (responses that the
# clients do not read)
BACKSTOP_S = 5.0


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket; OSError naming host:port when it cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    try:
        # SO_REUSEADDR (as uvicorn): a restart may bind while old connections sit in TIME_WAIT;
        # binding over a live listener still fails
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ending: asyncio.Event, shutdown_timeout: float,
                 on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.ending = ending
        self.shutdown_timeout = shutdown_timeout
        self.on_ready = on_ready
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown (to die of the signal); the
        # engine still has to shut down, and then we exit 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT and not self.ending.is_set():
            self._end_requests()  # second Ctrl-C: 503 to what is running, then exit
            return
        super().handle_exit(sig, frame)  # the first signal; a third Ctrl-C: exit now

    def _end_requests(self) -> None:
        # from a signal handler: wake the loop through its self-pipe
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.ending.set)

    async def shutdown(self, sockets=None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.ending.set)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            deadline.cancel()
