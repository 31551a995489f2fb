"""One sequence being generated: its tokens, its place in the KV cache, its status and timing.

Token accounting (all counts are positions in `token_ids` = prompt + output):

    token_ids:            p0 p1 p2 ... p9 o0 o1 o2
    num_computed_tokens:  |<--- KV in cache --->|           (advanced by Scheduler.postprocess)
    num_cached_tokens:    |<- prefix hit ->|                (set by BlockManager.allocate)
    block_table:          [b7, b2, b9]  -> position i lives in block block_table[i // block_size]

A running sequence computes `num_tokens - num_computed_tokens` tokens before it can sample: the
whole (rest of the) prompt at first, possibly in chunks; then exactly one per step (the token it
sampled last, whose KV is not in the cache yet). Preemption frees the blocks and resets
num_computed_tokens to 0; the sequence later recomputes prompt + outputs.
"""

from __future__ import annotations

import enum
import functools
import time
from array import array
from dataclasses import dataclass, field

from fusecc.runtime.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (then it holds no blocks either)
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token id, or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"

    # Keyed by the member's value string: hashing an Enum member runs Python code
    # (Enum.__hash__), and these are read for every sequence every step.
    @property
    def is_finished(self) -> bool:
        return self._value_ in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self._value_)


_FINISHED = frozenset({SequenceStatus.FINISHED_STOPPED.value, SequenceStatus.FINISHED_LENGTH.value,
                       SequenceStatus.FINISHED_ABORTED.value})
_FINISH_REASON = {SequenceStatus.FINISHED_STOPPED.value: "stop", SequenceStatus.FINISHED_LENGTH.value: "length",
                  SequenceStatus.FINISHED_ABORTED.value: "abort"}
FINISH_STATUS = {reason: SequenceStatus(value) for value, reason in _FINISH_REASON.items()}


@dataclass(eq=False)  # identity equality: two requests with equal prompts are different sequences
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    block_size: int = 16
    # Lower runs first; ties in arrival order (see Scheduler).
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # sampling_params.bad_words as token sequences (the engine tokenizes them; the sampler bans them)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)

    # Prompt then outputs; append-only, so the hashes of full blocks never change.
    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    status: SequenceStatus = field(init=False, default=SequenceStatus.WAITING)
    # Why the sequence stopped beyond the reason: the stop token id or stop string (OpenAI's stop_reason).
    stop_reason: int | str | None = field(init=False, default=None)
    block_table: list[int] = field(init=False, default_factory=list)
    num_computed_tokens: int = field(init=False, default=0)
    num_cached_tokens: int = field(init=False, default=0)
    # Async scheduling (fusecc/runtime/async_scheduling.py): tokens sampled by launched steps whose
    # values the host has not read back yet. num_computed_tokens already counts the positions those
    # steps computed; the tokens join token_ids when read back. 0 without async scheduling.
    num_pending_tokens: int = field(init=False, default=0)
    # Scheduler-assigned admission order; breaks arrival_time ties so ordering is total.
    seq_id: int = field(init=False, default=-1)
    num_preemptions: int = field(init=False, default=0)
    # Draft tokens proposed to follow token_ids (speculative decoding, fusecc/runtime/spec_decode/):
    # set before each schedule, verified by the step that schedules them, never part of token_ids.
    spec_token_ids: list[int] = field(init=False, default_factory=list, repr=False)
    # Owned by BlockManager: chained hashes of the full token blocks of token_ids (content only,
    # independent of where they are cached), and how many leading blocks of block_table are
    # registered in (or were found in) the prefix cache.
    block_hashes: list[int] = field(init=False, default_factory=list, repr=False)
    num_hashed_blocks: int = field(init=False, default=0, repr=False)

    first_scheduled_time: float | None = field(init=False, default=None)
    first_token_time: float | None = field(init=False, default=None)
    last_token_time: float | None = field(init=False, default=None)
    finished_time: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt must hold at least one token")
        if self.block_size < 1:
            raise ValueError(f"request {self.request_id!r}: block_size must be >= 1, got {self.block_size}")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)

    # --- tokens -----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens to compute before the next sample: the prompt (rest) at first, then 1 (with async
        scheduling the 1 may be a pending token, sampled by a launched step but not read back yet)."""
        return self.num_tokens + self.num_pending_tokens - self.num_computed_tokens

    @functools.cached_property
    def prompt_token_array(self) -> array:
        """The prompt as a C int64 array, built once: the sampler reads it every step for the
        repetition penalty, and converting Python int lists each step costs ~60 ns a token."""
        return array("q", self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    # --- blocks -----------------------------------------------------------------------------
    def num_blocks_needed(self, num_tokens: int | None = None) -> int:
        """Blocks that hold `num_tokens` tokens (default: all of token_ids)."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + self.block_size - 1) // self.block_size

    @property
    def num_full_blocks(self) -> int:
        return self.num_tokens // self.block_size

    @property
    def last_block_num_tokens(self) -> int:
        """Tokens in the last (possibly partial) block of token_ids: 1..block_size."""
        return self.num_tokens - (self.num_blocks_needed() - 1) * self.block_size

    def block_token_ids(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    # --- status -----------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """'stop', 'length', 'abort', or None while unfinished."""
        return self.status.finish_reason
