"""AsyncLLMEngine: the LLMEngine stepped by one background thread, streamed to asyncio.

    engine = AsyncLLMEngine.from_engine_args("path/to/hf-dir")
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text)          # cumulative; the last output has finished=True

The thread runs `engine.step()` while requests are unfinished and sleeps on an event otherwise;
each step's outputs are handed to the event loop with `loop.call_soon_threadsafe` and routed to
the per-request asyncio.Queue. A consumer that stops iterating (break, task cancelled) aborts its
request in the generator's `finally`, which frees its KV blocks at the next step. Validation
(ValueError naming the field, SchedulerFullError) happens in `generate` before anything is queued.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.outputs import EngineStats, RequestOutput
from fusecc.runtime.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        # request id -> (its event loop, its queue); filled by generate(), read by the thread
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fusecc-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, model: str | None = None, **engine_args) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_engine_args(model, **engine_args))

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise RuntimeError("the engine thread failed") from self._error
        if self._stop:
            raise RuntimeError("the engine is shut down")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(request_id, prompt, params)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine thread failed") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.engine.abort_request(request_id)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # --- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # deliver to every waiting consumer, then stop
                self._error = exc
                for loop, queue in list(self._streams.values()):
                    loop.call_soon_threadsafe(queue.put_nowait, exc)
                return
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    loop, queue = stream
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, out)
                    except RuntimeError:  # the consumer's loop is closed
                        self.engine.abort_request(out.request_id)
