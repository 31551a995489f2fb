"""Engine options: one dataclass, validated on construction.

    config = EngineConfig(max_model_len=2048, num_kv_blocks=512)
    config = dataclasses.replace(config, max_model_len=1024)   # re-validated

The model runner resolves what depends on the model and the device (the KV pool size from
`gpu_memory_utilization` when `num_kv_blocks` is None, and may lower `max_model_len` to the
model's context length with `dataclasses.replace`); the scheduler and block manager only read it.
The pool's peak usage is `LLMEngine.stats().peak_kv_cache_usage`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # Tokens per KV-cache block. Prefix caching shares whole blocks only, so smaller blocks share
    # more of a common prefix but cost longer block tables.
    block_size: int = 16
    # Sequences in the running batch (prefills and decodes together) at most.
    max_num_seqs: int = 256
    # The per-step token budget: the total number of new tokens (prompt chunks + one per decode)
    # computed by one forward pass. Bounds activation memory and the latency of a step.
    max_num_batched_tokens: int = 8192
    # Prompt + generated tokens of one sequence at most. A sequence reaching it finishes with
    # reason "length"; a prompt that leaves no room for one generated token is rejected.
    max_model_len: int = 4096
    # Reuse the KV of full blocks whose token prefix was seen before (shared system prompts,
    # recompute after preemption).
    enable_prefix_caching: bool = True
    # Split prompts longer than the remaining token budget over several steps, so a long prompt
    # neither stalls running decodes nor needs max_num_batched_tokens >= max_model_len.
    enable_chunked_prefill: bool = True
    # Fraction of total GPU memory the runner may use (weights + activations + KV pool); the
    # pool gets what is left after a profiling forward pass.
    gpu_memory_utilization: float = 0.9
    # Explicit KV pool size in blocks (vLLM's num_gpu_blocks_override); None = sized from memory
    # by the model runner (gpu_memory_utilization on CUDA, CPU_DEFAULT_KV_BLOCKS on CPU). Set it
    # to make the pool, not free memory, the limit on concurrency: each block holds block_size
    # tokens of K and V for every layer. Must hold one max_model_len sequence.
    num_kv_blocks: int | None = None
    # Admission control: new requests beyond this many waiting ones are refused
    # (Scheduler.add raises SchedulerFullError, which a server maps to HTTP 503).
    max_waiting: int = 4096
    # Seed of the sampler's generator for requests without their own seed; None = nondeterministic.
    seed: int | None = 0

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "block_size", self.block_size, "must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        _require(self.max_model_len >= 2, "max_model_len", self.max_model_len,
                 "must be >= 2 (one prompt token and one generated token)")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 self.max_num_batched_tokens, "must be >= 1")
        # Every running sequence must be able to decode in the same step, or some decodes would
        # be skipped each step for no reason.
        _require(self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens",
                 self.max_num_batched_tokens, f"must be >= max_num_seqs ({self.max_num_seqs})")
        if not self.enable_chunked_prefill:
            # Without chunking a whole prompt must fit in one step's budget, or it waits forever.
            _require(self.max_num_batched_tokens >= self.max_model_len, "max_num_batched_tokens",
                     self.max_num_batched_tokens,
                     f"must be >= max_model_len ({self.max_model_len}) when enable_chunked_prefill is False")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 self.gpu_memory_utilization, "must be in (0, 1]")
        if self.num_kv_blocks is not None:
            _require(self.num_kv_blocks >= 1, "num_kv_blocks", self.num_kv_blocks, "must be >= 1 or None")
        _require(self.max_waiting >= 1, "max_waiting", self.max_waiting, "must be >= 1")


def _require(ok: bool, name: str, value: object, what: str) -> None:
    if not ok:
        raise ValueError(f"EngineConfig.{name} {what}, got {value!r}")
