"""Client disconnects end the work done for them.

    result = await until_disconnected(request, collect(...))   # raises ClientDisconnected, cancelling it
    return SSEResponse(event_generator())                        # cancelled and closed on disconnect

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

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`; if the client goes away first, cancel it and raise ClientDisconnected."""
    work = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            # Let the cancellation run through engine.generate (abort, free blocks) before returning.
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientDisconnected()
    return work.result()


class SSEResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], status_code: int = 200) -> None:
        super().__init__(events, status_code=status_code, headers={"Cache-Control": "no-cache"},
                         media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            async with anyio.create_task_group() as tg:
                async def run_pump() -> None:
                    try:
                        await pump()
                    except OSError:  # the socket went away under a write
                        pass
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await _wait_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(run_pump)
                tg.start_soon(watch)
        finally:
            # The iterator may be parked at a yield (cancelled during send): close it so its
            # `finally` (abort in the engine) runs now, not at garbage collection.
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
