"""A deterministic stand-in for AsyncLLMEngine: same interface, no model, byte-level tokenizer.

Generated token k of choice j for prompt ids P is the letter chr(97 + (sum(P) + k + 7*j) % 26),
so a test can compute every answer with `expected_text`. It keeps the engine's bookkeeping that
the server reports: a running batch of at most max_num_seqs (the rest wait), a waiting queue of
at most max_waiting (SchedulerFullError beyond), KV blocks per running sequence (freed when it
finishes or is aborted), and the EngineStats counters.

    python -m fusecc.serve.cli --engine-factory tests.serve.fake_engine:make_engine ...
    FUSECC_FAKE_TOKEN_DELAY=0.01   # seconds per decode step (default 0.002)

A prompt that starts with FAIL_PROMPT makes its request fail with a RuntimeError after two
outputs (an engine failure in the middle of a response).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from fusecc.runtime.outputs import CompletionOutput, EngineStats, Logprob, RequestMetrics, RequestOutput
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import SchedulerFullError

EOS = 256
FAIL_PROMPT = "FAIL"


def fake_token(prompt_ids: list[int], k: int, choice: int = 0) -> int:
    return 97 + (sum(prompt_ids) + k + 7 * choice) % 26


def expected_text(prompt: str | list[int], max_tokens: int, choice: int = 0) -> str:
    ids = FakeTokenizer().encode(prompt) if isinstance(prompt, str) else prompt
    return "".join(chr(fake_token(ids, k, choice)) for k in range(max_tokens))


class FakeTokenizer:
    vocab_size = 257  # 256 bytes and EOS
    eos_token_id = EOS
    bos_token_id = None
    chat_template = "fake"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"[{m['role']}] {m['content']}\n" for m in messages)
        return text + ("[assistant] " if add_generation_prompt else "")


@dataclass
class _Pool:
    num_blocks: int
    block_size: int
    used: dict[str, int] = field(default_factory=dict)  # request id -> blocks

    def grow(self, request_id: str, num_tokens: int) -> None:
        self.used[request_id] = math.ceil(num_tokens / self.block_size)
        assert sum(self.used.values()) <= self.num_blocks, "fake KV pool overflow"

    def free(self, request_id: str) -> None:
        self.used.pop(request_id, None)


class FakeAsyncEngine:
    def __init__(self, max_model_len: int = 512, max_num_seqs: int = 256, max_waiting: int = 4096,
                 num_kv_blocks: int | None = None, block_size: int = 16, token_delay: float = 0.002,
                 model_name: str = "fake-model") -> None:
        self.tokenizer = FakeTokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = FakeTokenizer.vocab_size
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.token_delay = token_delay
        blocks = num_kv_blocks or max_num_seqs * math.ceil(max_model_len / block_size)
        self.pool = _Pool(blocks, block_size)
        self.running: set[str] = set()
        self.waiting: list[str] = []
        self.aborted: list[str] = []
        self._abort_requested: set[str] = set()
        self._counts = Counter()
        self._finished = Counter()
        self._slot_freed: asyncio.Condition | None = None
        self.is_shut_down = False

    @classmethod
    def from_engine_args(cls, model: str | None = None, **engine_args) -> "FakeAsyncEngine":
        known = {k: engine_args[k] for k in ("max_model_len", "max_num_seqs", "max_waiting", "num_kv_blocks")
                 if engine_args.get(k) is not None}
        return cls(token_delay=float(os.environ.get("FUSECC_FAKE_TOKEN_DELAY", "0.002")), **known)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           kv_cache_usage=sum(self.pool.used.values()) / self.pool.num_blocks,
                           num_preemptions=0, prefix_cache_queries=self._counts["prefix_queries"],
                           prefix_cache_hits=0, prompt_tokens_total=self._counts["prompt"],
                           generation_tokens_total=self._counts["generation"],
                           finished_by_reason=dict(self._finished))

    async def abort(self, request_id: str) -> None:
        if request_id in self.running or request_id in self.waiting:
            self._abort_requested.add(request_id)

    async def shutdown(self) -> None:
        self.is_shut_down = True

    def check_health(self) -> None:
        if self.is_shut_down:
            raise RuntimeError("the engine is shut down")

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids or len(ids) + 1 > self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt of {len(ids)} tokens does not fit")
        if request_id in self.running or request_id in self.waiting:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(self.waiting) >= self.max_waiting:
            raise SchedulerFullError(f"{len(self.waiting)} requests waiting (max_waiting={self.max_waiting})")
        if self._slot_freed is None:
            self._slot_freed = asyncio.Condition()
        metrics = RequestMetrics(arrival_time=time.time(), first_scheduled_time=None, first_token_time=None,
                                 finished_time=None)
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        fails = bytes(i for i in ids if i < 256).startswith(FAIL_PROMPT.encode())
        outs = [CompletionOutput(index=j, text="", token_ids=[], finish_reason=None,
                                 logprobs=[] if params.logprobs is not None else None) for j in range(params.n)]
        finished = False
        self.waiting.append(request_id)
        try:
            async with self._slot_freed:
                await self._slot_freed.wait_for(lambda: len(self.running) < self.max_num_seqs)
                self.waiting.remove(request_id)
                self.running.add(request_id)
            metrics.first_scheduled_time = time.time()
            self._counts["prompt"] += len(ids)
            self._counts["prefix_queries"] += len(ids)
            for k in range(max_tokens):
                await asyncio.sleep(self.token_delay)
                if request_id in self._abort_requested:
                    return
                if fails and k == 2:
                    raise RuntimeError("fake engine failure")
                self.pool.grow(request_id, len(ids) + k + 1)
                for o in outs:
                    if o.finish_reason is not None:
                        continue
                    tok = fake_token(ids, k, o.index)
                    o.token_ids.append(tok)
                    o.text += chr(tok)
                    self._counts["generation"] += 1
                    if o.logprobs is not None:  # vLLM's shape: the sampled token (rank 1 here) and the top ones
                        top = [(tok, -0.25)] + [(97 + (tok - 97 + d) % 26, -2.0 - d) for d in range(1, params.logprobs + 1)]
                        o.logprobs.append({t: Logprob(v, rank=r, decoded_token=chr(t))
                                           for r, (t, v) in enumerate(top[:max(params.logprobs, 1)], start=1)})
                    hit = next((s for s in params.stop if s in o.text), None)
                    if hit is not None:
                        o.text = o.text[:o.text.index(hit)]
                        o.finish_reason, o.stop_reason = "stop", hit
                    elif len(o.token_ids) >= max_tokens:
                        o.finish_reason = "length"
                if metrics.first_token_time is None:
                    metrics.first_token_time = time.time()
                finished = all(o.finish_reason is not None for o in outs)
                if finished:
                    metrics.finished_time = time.time()
                    for o in outs:
                        self._finished[o.finish_reason] += 1
                yield RequestOutput(request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                                    prompt_token_ids=ids, outputs=[_copy(o) for o in outs], finished=finished,
                                    metrics=metrics)
                if finished:
                    return
        finally:
            if not finished:
                self.aborted.append(request_id)
                self._finished["abort"] += 1
            self._abort_requested.discard(request_id)
            if request_id in self.waiting:
                self.waiting.remove(request_id)
            self.running.discard(request_id)
            self.pool.free(request_id)
            if self._slot_freed is not None and not self._slot_freed.locked():
                # notify needs the lock; a cancelled generator must not block in finally.
                async with self._slot_freed:
                    self._slot_freed.notify_all()


def _copy(o: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(index=o.index, text=o.text, token_ids=list(o.token_ids), finish_reason=o.finish_reason,
                            stop_reason=o.stop_reason, logprobs=list(o.logprobs) if o.logprobs is not None else None)


def make_engine(model: str | None = None, **engine_args) -> FakeAsyncEngine:
    return FakeAsyncEngine.from_engine_args(model, **engine_args)
