"""Iteration-level continuous batching over the paged KV cache.

One engine step (LLMEngine.step):

    out = scheduler.schedule()                       # who computes how many tokens this step
    sampled = model_runner.execute(out)              # forward + sampler: one token per entry of out.sampled
    scheduler.postprocess(out, sampled.token_ids.tolist())   # commit KV progress and the tokens
    for seq, stop in output_processor.process_tokens(out, sampled, token_ids):   # stop_checker decides
        scheduler.finish(seq, stop.reason, stop.stop_reason)
    for seq in scheduler.take_finished(): ...        # every finished request, exactly once

The scheduler decides who runs, never who stops: it finishes what it is told (`finish`, `abort`)
and frees the blocks. `abort`, `finish` and `add` are for between steps. (An abort between
schedule and postprocess is tolerated: postprocess skips the aborted entry.)

Policy, per `schedule()`:
1. Running sequences, decodes first, then continuing chunked prefills, each in priority order.
   Each needs slots for its new tokens; when the pool is out of blocks the running sequence with
   the largest (priority, arrival) is preempted by recompute: blocks freed, progress reset, back
   to the waiting queue (ahead of everything that arrived after it). Possibly itself.
2. If nothing was preempted: waiting sequences in (priority, arrival) order, while the token
   budget, max_num_seqs and the free blocks allow. Prefix hits are skipped; a prompt longer than
   the remaining budget gets a chunk (chunked prefill) and continues next step. Admission stops
   at the first sequence that does not fit (no overtaking: a large request is not starved).

Liveness: the constructor requires the pool to hold one max_model_len sequence and `add` takes
only prompts that leave room for a token within max_model_len (the engine checks prompts, the
scheduler asserts it), so the oldest running sequence always progresses and every request ends
in finitely many steps (the stop checker ends a sequence at max_model_len).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.sequence import FINISH_STATUS, Sequence, SequenceStatus


class SchedulerFullError(RuntimeError):
    """The waiting queue holds max_waiting sequences; retry later (the server answers HTTP 429)."""


@dataclass
class ScheduledSequence:
    """What the model runner computes for one sequence this step: positions [start, context_len)."""

    seq: Sequence
    start: int  # == seq.num_computed_tokens when scheduled
    num_new_tokens: int
    # A decode computes exactly the last sampled token; everything else (prompt chunks, recompute
    # after preemption) is a prefill. Any 1-token entry is decode-shaped for attention.
    is_prefill: bool
    # The entry reaches the end of the known tokens, so its last position's logits are sampled.
    do_sample: bool
    # KV-cache slot for each new token (block_table[p // block_size] * block_size + p % block_size).
    slot_mapping: list[int]
    # Draft tokens verified by this decode (speculative decoding): the new tokens are the last
    # sampled token then these; logits of all of them are sampled. Empty for everything else.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        known = self.num_new_tokens - len(self.spec_token_ids)
        return self.seq.token_ids[self.start:self.start + known] + self.spec_token_ids

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.num_new_tokens)

    @property
    def context_len(self) -> int:
        """Tokens the new tokens attend to (cached + new), i.e. the sequence's KV length after the step."""
        return self.start + self.num_new_tokens

    @property
    def block_table(self) -> list[int]:
        """The sequence's blocks; covers context_len. Read-only for the runner."""
        return self.seq.block_table


@dataclass
class SchedulerOutput:
    # Decodes first, then prefills; the runner may rely on that order (decode rows contiguous).
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def sampled(self) -> list[ScheduledSequence]:
        """Entries that take a sample, in order: one logits row and one sampled token each."""
        return [e for e in self.scheduled if e.do_sample]

    @property
    def num_batched_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_finished: Counter = field(default_factory=Counter)  # by finish reason
    num_prefill_tokens: int = 0  # scheduled, including recompute
    num_decode_tokens: int = 0


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        if block_manager.block_size != config.block_size:
            raise ValueError(f"block manager block_size {block_manager.block_size} != "
                             f"EngineConfig.block_size {config.block_size}")
        capacity = block_manager.num_blocks * block_manager.block_size
        if config.max_model_len > capacity:
            raise ValueError(
                f"EngineConfig.max_model_len ({config.max_model_len}) exceeds the KV pool "
                f"({block_manager.num_blocks} blocks x {block_manager.block_size} = {capacity} tokens): one "
                f"sequence could never finish. Lower max_model_len or give the pool more memory "
                f"(gpu_memory_utilization / num_kv_blocks).")
        self.config = config
        self.block_manager = block_manager
        # Sorted by _order_key; a preempted sequence sorts back ahead of later arrivals.
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}  # every unfinished sequence
        self._finished: list[Sequence] = []  # finished since the last take_finished()
        self._next_seq_id = itertools.count()
        self.stats = SchedulerStats()

    # --- requests in and out ------------------------------------------------------------------
    def check_room(self, n: int = 1) -> None:
        """SchedulerFullError unless `n` more sequences may wait (EngineConfig.max_waiting)."""
        if len(self.waiting) + n > self.config.max_waiting:
            raise SchedulerFullError(f"{len(self.waiting)} sequences waiting, {n} more refused "
                                     f"(max_waiting={self.config.max_waiting})")

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; SchedulerFullError if the queue is full. The caller (the engine)
        has checked the request: a fresh sequence, a unique id, a prompt with room to generate."""
        cfg = self.config
        assert seq.request_id not in self._by_id, f"request id {seq.request_id!r} is already in use"
        assert seq.status is SequenceStatus.WAITING and not seq.block_table and not seq.num_computed_tokens, \
            f"request {seq.request_id!r}: only a fresh sequence can be added"
        assert seq.block_size == cfg.block_size, (seq.block_size, cfg.block_size)
        # the constructor's pool check makes a prompt within max_model_len fit the pool too
        assert seq.num_tokens + 1 <= cfg.max_model_len, \
            f"request {seq.request_id!r}: prompt of {seq.num_tokens} tokens, max_model_len={cfg.max_model_len}"
        self.check_room(1)
        seq.seq_id = next(self._next_seq_id)
        self._by_id[seq.request_id] = seq
        bisect.insort(self.waiting, seq, key=_order_key)

    def abort(self, request_id: str) -> bool:
        """Abort a waiting or running request. False if unknown or already finished (reported once only)."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return False
        self._finish(seq, SequenceStatus.FINISHED_ABORTED)
        return True

    def finish(self, seq: Sequence, reason: str = "stop", stop_reason: int | str | None = None) -> bool:
        """End `seq` as the stop checker decided: reason "stop" or "length" (or "abort"). False if
        it is already finished or not this scheduler's."""
        if reason not in FINISH_STATUS:
            raise ValueError(f"finish reason must be one of {sorted(FINISH_STATUS)}, got {reason!r}")
        if seq.is_finished or self._by_id.get(seq.request_id) is not seq:
            return False
        seq.stop_reason = stop_reason
        self._finish(seq, FINISH_STATUS[reason])
        return True

    def take_finished(self) -> list[Sequence]:
        """Sequences finished (any reason, aborts included) since the last call; each is returned once."""
        out, self._finished = self._finished, []
        return out

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._by_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._by_id)

    # --- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg, bm = self.config, self.block_manager
        now = time.monotonic()
        budget = cfg.max_num_batched_tokens
        entries: dict[int, ScheduledSequence] = {}  # by seq_id, so a preempted entry can be withdrawn
        preempted: list[Sequence] = []

        # Decodes (1 uncomputed token) first, then continuing prefills; each group in priority order.
        for seq in sorted(self.running, key=_running_order_key):
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            assert seq.num_uncomputed_tokens >= 1, seq.request_id  # a running sequence always has work
            if seq.num_pending_tokens and self._pending_token_ends(seq):
                continue  # async scheduling: the token being read back finishes it; no step after it
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                continue  # budget spent; it keeps its blocks and runs next step
            spec = self._spec_tokens(seq, budget - n)
            if spec and bm.can_append(seq, n + len(spec)):  # drafts are dropped before anyone is preempted
                bm.append_slots(seq, n + len(spec))
                entries[seq.seq_id] = self._entry(seq, n + len(spec), spec)
                budget -= n + len(spec)
                continue
            while not bm.can_append(seq, n):
                victim = max(self.running, key=_order_key)
                if victim.seq_id in entries:
                    budget += entries.pop(victim.seq_id).num_new_tokens
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.append_slots(seq, n)
            entries[seq.seq_id] = self._entry(seq, n)
            budget -= n

        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                seq = self.waiting[0]
                if seq.num_pending_tokens:  # preempted with a token in flight: admitted once it is read back
                    break
                remaining = seq.num_tokens - bm.num_matched_tokens(seq)
                if remaining > budget and not cfg.enable_chunked_prefill:
                    break
                n = min(remaining, budget)
                if not bm.can_allocate(seq, n):
                    break
                bm.allocate(seq, n)
                self.waiting.pop(0)
                seq.status = SequenceStatus.RUNNING
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = now
                self.running.append(seq)
                entries[seq.seq_id] = self._entry(seq, n)
                budget -= n

        scheduled = sorted(entries.values(), key=lambda e: e.is_prefill)  # stable: decodes first
        num_prefill_tokens = sum(e.num_new_tokens for e in scheduled if e.is_prefill)
        self.stats.num_prefill_tokens += num_prefill_tokens
        self.stats.num_decode_tokens += cfg.max_num_batched_tokens - budget - num_prefill_tokens
        assert sum(e.num_new_tokens for e in scheduled) == cfg.max_num_batched_tokens - budget
        assert len(self.running) <= cfg.max_num_seqs
        return SchedulerOutput(scheduled=scheduled, preempted=preempted)

    def preempt(self, seq: Sequence) -> None:
        """Preempt a running sequence by recompute: free its blocks, reset its progress, re-queue it.

        Called by schedule() when blocks run out; public so tests (and an engine under memory
        pressure) can force it between steps.
        """
        assert seq.status is SequenceStatus.RUNNING, (seq.request_id, seq.status)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_order_key)

    def postprocess(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> None:
        """Commit a step: advance KV progress and append the sampled tokens (who stops is the stop
        checker's decision, applied with `finish`).

        `sampled_token_ids[i]` is the token sampled for `output.sampled[i]`.
        """
        num_sampled = sum(e.do_sample for e in output.scheduled)
        assert len(sampled_token_ids) == num_sampled, (len(sampled_token_ids), num_sampled)
        tokens = iter(sampled_token_ids)  # one per do_sample entry, in order
        now = time.monotonic()
        for e in output.scheduled:
            token = next(tokens) if e.do_sample else None
            seq = e.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted (or finished by a stop string) after schedule()
            assert seq.num_computed_tokens == e.start, (seq.request_id, seq.num_computed_tokens, e.start)
            seq.num_computed_tokens += e.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if token is not None:
                _append_sampled(seq, token, now)

    # --- async scheduling (fusecc/runtime/async_scheduling.py) ------------------------------
    def mark_launched(self, output: SchedulerOutput) -> None:
        """A decode step was launched without reading its tokens back: its positions count as
        computed and each of its sequences has one more pending token."""
        for e in output.scheduled:
            assert e.do_sample and e.num_new_tokens == 1 and not e.spec_token_ids, e.seq.request_id
            if e.seq.is_finished:  # aborted while the step was being launched: its read-back skips it too
                continue
            e.seq.num_computed_tokens += 1
            e.seq.num_pending_tokens += 1

    def postprocess_launched(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> None:
        """The tokens of a launched step, read back: they join their sequences (postprocess's part
        that mark_launched left). A sequence finished or aborted since is skipped (its token was
        computed for nothing); one preempted since takes its token and recomputes it later."""
        assert len(sampled_token_ids) == len(output.scheduled), (len(sampled_token_ids), len(output.scheduled))
        now = time.monotonic()
        for e, token in zip(output.scheduled, sampled_token_ids):
            seq = e.seq
            if seq.is_finished:
                continue
            seq.num_pending_tokens -= 1
            _append_sampled(seq, token, now)
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq)

    def _pending_token_ends(self, seq: Sequence) -> bool:
        """Whether the sequence's pending tokens bring it to max_tokens or max_model_len."""
        return (seq.num_output_tokens + seq.num_pending_tokens >= seq.sampling_params.max_tokens
                or seq.num_tokens + seq.num_pending_tokens >= self.config.max_model_len)

    # --- internals ----------------------------------------------------------------------------
    @staticmethod
    def _spec_tokens(seq: Sequence, budget_left: int) -> list[int]:
        """The drafts a decode verifies this step (seq.spec_token_ids, cut to the budget left)."""
        if not seq.spec_token_ids or seq.num_uncomputed_tokens != 1 or seq.num_tokens <= seq.num_prompt_tokens:
            return []
        return seq.spec_token_ids[:budget_left]

    def _entry(self, seq: Sequence, n: int, spec: list[int] | None = None) -> ScheduledSequence:
        start = seq.num_computed_tokens
        num_tokens = len(seq.token_ids) + seq.num_pending_tokens + (len(spec) if spec else 0)
        do_sample = start + n == num_tokens
        is_decode = (n == 1 or bool(spec)) and do_sample and num_tokens > seq.num_prompt_tokens
        return ScheduledSequence(seq=seq, start=start, num_new_tokens=n, is_prefill=not is_decode,
                                 do_sample=do_sample,
                                 slot_mapping=self.block_manager.slot_mapping(seq, start, start + n),
                                 spec_token_ids=list(spec) if spec else [])

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        assert status.is_finished and not seq.is_finished
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = status
        seq.finished_time = time.monotonic()
        del self._by_id[seq.request_id]
        self._finished.append(seq)
        self.stats.num_finished[status.finish_reason] += 1


def _append_sampled(seq: Sequence, token, now: float) -> None:
    seq.append_token(int(token))
    if seq.first_token_time is None:
        seq.first_token_time = now
    seq.last_token_time = now


def _order_key(seq: Sequence) -> tuple[int, float, int]:
    return (seq.priority, seq.arrival_time, seq.seq_id)


def _running_order_key(seq: Sequence) -> tuple[bool, int, float, int]:
    # decodes (one uncomputed token) before continuing prefills, then _order_key
    return (seq.num_uncomputed_tokens > 1, *_order_key(seq))
