"""What the engine returns per step and per request. Outputs are CUMULATIVE: every RequestOutput
holds the text and token ids generated so far (like vLLM); the last one has finished=True."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # 'stop' | 'length' | 'abort' | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # per generated token: {"token_id": int, "logprob": float, "top": [(token_id, logprob), ...]}
    logprobs: list[dict] | None = None


@dataclass
class RequestMetrics:
    arrival_time: float  # time.monotonic() clock, like every time below
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    num_preemptions: int
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_by_reason: dict[str, int] = field(default_factory=dict)
