"""Client disconnects, and the server's shutdown deadline, end the work done for a request.

    result = await until_disconnected(request, collect(...), ending)   # raises ClientDisconnected / ServerEnding
    return SSEResponse(event_generator(), ending, last_words)          # cancelled and closed on either

`ending` is an asyncio.Event the server sets when in-flight requests must stop (the shutdown
timeout passed, or a second Ctrl-C): a request still running then gets a 503 (a stream: the
`last_words` error event and [DONE]) from the app itself, instead of being cancelled by uvicorn,
which answers a plain-text 500 or cuts the stream, and logs a CancelledError for each.

Cancelling the coroutine that iterates `engine.generate` is what aborts the request in the
engine and frees its KV blocks (the engine's contract). Starlette's own StreamingResponse only
notices a disconnect at the next write under ASGI spec >= 2.4 and never closes the body
iterator, so a stream stuck in a long prefill would keep its blocks: SSEResponse listens for
`http.disconnect` concurrently and always `aclose()`s the iterator.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fusecc.serve.access_log import CLIENT_CLOSED, SERVER_ENDED, mark_aborted

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


class ServerEnding(Exception):
    """The server ended the request (shutdown) before it finished."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, aw: Awaitable[T], ending: asyncio.Event | None = None) -> T:
    """Await `aw`; if the client goes away first (or `ending` is set), cancel it and raise
    ClientDisconnected (or ServerEnding)."""
    work = asyncio.ensure_future(aw)
    watchers = [asyncio.ensure_future(_wait_for_disconnect(request.receive))]
    if ending is not None:
        watchers.append(asyncio.ensure_future(ending.wait()))
    try:
        await asyncio.wait({work, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in watchers:
            w.cancel()
        if not work.done():
            work.cancel()
            # Let the cancellation run through engine.generate (abort, free blocks) before returning.
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        if ending is not None and ending.is_set():
            raise ServerEnding()
        raise ClientDisconnected()
    return work.result()


class SSEResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], ending: asyncio.Event | None = None, last_words: str = "",
                 status_code: int = 200) -> None:
        super().__init__(events, status_code=status_code, headers={"Cache-Control": "no-cache"},
                         media_type="text/event-stream")
        self.events = events
        self.ending = ending
        self.last_words = last_words  # sent when the server ends the stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = complete = False
        ended_by = None

        async def start() -> None:
            nonlocal started
            started = True
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def pump() -> None:
            nonlocal complete
            await start()
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            complete = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            async with anyio.create_task_group() as tg:
                async def run_pump() -> None:
                    nonlocal ended_by
                    try:
                        await pump()
                    except OSError:  # the socket went away under a write
                        ended_by = ended_by or "client"
                    tg.cancel_scope.cancel()

                async def watch(what: str, event: Awaitable) -> None:
                    nonlocal ended_by
                    await event
                    ended_by = ended_by or what
                    tg.cancel_scope.cancel()

                tg.start_soon(run_pump)
                tg.start_soon(watch, "client", _wait_for_disconnect(receive))
                if self.ending is not None:
                    tg.start_soon(watch, "server", self.ending.wait())
        finally:
            # The iterator may be parked at a yield (cancelled during send): close it so its
            # `finally` (abort in the engine) runs now, not at garbage collection.
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
        if complete:
            return
        if ended_by == "client":
            mark_aborted(scope, CLIENT_CLOSED, "client disconnected")
        elif ended_by == "server":
            mark_aborted(scope, SERVER_ENDED, "server shutting down")
            if not started:
                await start()
            await send({"type": "http.response.body", "body": self.last_words.encode(), "more_body": False})
