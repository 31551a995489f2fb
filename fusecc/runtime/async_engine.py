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
import dataclasses
import itertools
import threading
from typing import AsyncIterator, Callable

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.model_runner import bind_device
from fusecc.runtime.outputs import EngineStats, RequestOutput
from fusecc.runtime.sampling_params import SamplingParams


class EngineShutDown(RuntimeError):
    """Raised in a generate() consumer whose request was still running when shutdown() stopped the engine."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.runner.vocab_size  # the model's embedding rows: what a token id may be
        self.max_waiting = engine.config.max_waiting
        # engine request id -> (its event loop, its queue); filled by generate(), read by the thread.
        # The engine id is the caller's id plus a serial number: an id reused right after its last
        # consumer left must not receive the old request's final (abort) output.
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._engine_ids: dict[str, str] = {}  # caller's request id -> engine request id
        self._serial = itertools.count()
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        # called (on the engine thread) once the engine has failed for good: fusecc-serve shuts the
        # server down then, as vLLM's does when its engine dies
        self.on_failure: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="fusecc-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, model: str | None = None, **engine_args) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_engine_args(model, **engine_args))

    def check_health(self) -> None:
        """Raise RuntimeError when the engine cannot take requests: its thread failed or it was shut down."""
        if self._error is not None:
            raise RuntimeError(f"the engine thread failed: {type(self._error).__name__}: {self._error}") \
                from self._error
        if self._stop:
            raise RuntimeError("the engine is shut down")

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self.check_health()
        if request_id in self._engine_ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        engine_id = f"{request_id}@{next(self._serial)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[engine_id] = (asyncio.get_running_loop(), queue)
        self._engine_ids[request_id] = engine_id
        try:
            self.engine.add_request(engine_id, prompt, params)
        except BaseException:
            self._streams.pop(engine_id, None)
            self._engine_ids.pop(request_id, None)
            raise
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, EngineShutDown):
                    raise EngineShutDown(f"the engine was shut down before request {request_id!r} finished")
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine thread failed") from item
                finished = item.finished
                yield dataclasses.replace(item, request_id=request_id)
                if finished:
                    return
        finally:
            self._streams.pop(engine_id, None)
            self._engine_ids.pop(request_id, None)
            if not finished:
                self.engine.abort_request(engine_id)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        engine_id = self._engine_ids.get(request_id)
        if engine_id is not None:
            self.engine.abort_request(engine_id)
            self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # --- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        device = getattr(self.engine.runner, "device", None)
        if device is not None:
            bind_device(device)  # this thread steps the engine: its kernels go to the model's GPU
        self._run()
        if self._error is None:  # shut down: nobody will step again, so tell every open stream
            for loop, queue in list(self._streams.values()):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, EngineShutDown())
                except RuntimeError:  # the consumer's loop is closed
                    pass

    def _run(self) -> None:
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
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, exc)
                    except RuntimeError:  # that consumer's loop is closed; tell the others
                        pass
                if self.on_failure is not None:
                    self.on_failure(exc)
                return
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    loop, queue = stream
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, out)
                    except RuntimeError:  # the consumer's loop is closed
                        self.engine.abort_request(out.request_id)
