"""What the engine returns per step and per request. By default outputs are CUMULATIVE: every
RequestOutput holds the text and token ids generated so far (like vLLM); the last one has
finished=True. SamplingParams.output_kind="delta" makes each carry only what is new."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability, as vLLM reports it."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token of the distribution
    decoded_token: str | None = None  # the token's text (tokenizer.decode([token_id]))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # 'stop' | 'length' | 'abort' | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per generated token (SamplingParams.logprobs set): {token id: Logprob} holding the sampled
    # token and the top-`logprobs` tokens (k or k + 1 entries: the sampled one may be among them).
    logprobs: list[dict[int, Logprob]] | None = None
    # Sum of the sampled tokens' logprobs (all of them so far, also for "delta" outputs); None without logprobs.
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


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
    # SamplingParams.prompt_logprobs set: per prompt token, None for the first, then {token id:
    # Logprob} holding the prompt token and the top-`prompt_logprobs` tokens (vLLM's). In every
    # output of a "cumulative" or "final_only" request; in the first output only of a "delta" one
    # (later outputs hold []); None when not asked for.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class StepTimings:
    """Where LLMEngine.step spends its time (time.perf_counter seconds, cumulative).

    No device synchronisation is added: the step's one synchronisation is the device-to-host
    copy of the sampled tokens, and the time blocked in it is `*_wait_seconds`. So per kind,
    seconds - wait_seconds is host time (scheduling, input preparation, kernel launches,
    postprocessing), and wait_seconds is device time that host work did not hide (launches are
    asynchronous: a long prefill's device time partly overlaps its own launches, so wait is a
    lower bound on device time). A step is a prefill step if any scheduled sequence computes
    prompt (or recompute) tokens, else a decode step.
    """

    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_wait_seconds: float = 0.0
    decode_wait_seconds: float = 0.0
    # host phases, all steps together
    schedule_seconds: float = 0.0
    execute_seconds: float = 0.0  # input preparation, forward / graph replay launch, sampler launch
    postprocess_seconds: float = 0.0  # scheduler.postprocess, detokenization, stop strings, outputs
    graph_replays: int = 0  # decode steps run as a CUDA graph replay


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
    # highest kv_cache_usage since start or BlockManager.reset_peak()
    peak_kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    step_timings: StepTimings = field(default_factory=StepTimings)
    # speculative decoding's counters (fusecc/runtime/spec_decode/speculator.py SpecDecodeStats:
    # num_drafts, num_draft_tokens, num_accepted_tokens, acceptance_rate, mean_accepted_length);
    # None without speculative_config
    spec_decode: object | None = None
