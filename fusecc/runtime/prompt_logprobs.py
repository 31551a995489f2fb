"""Log-probabilities of prompt tokens (SamplingParams.prompt_logprobs), computed by the model runner.

    planner = PromptLogprobsPlanner()                         # one per runner
    spans = planner.plan(scheduler_output.scheduled, inputs.cu_seqlens_q, inputs.num_decodes)
    out = compute_prompt_logprobs(spans, hidden, model.compute_logits, to_device)   # None when spans == []

The logits at position p give the log-probability of prompt token p + 1, so a prompt of P tokens
has P - 1 of them (vLLM's list starts with None for token 0). For a request that asks, the runner
takes the logits of every prompt position its chunks compute, not only the last; the rows of
other requests are never touched, so a step where no request asks builds no [tokens, vocab] tensor
and costs one attribute test per prefill entry (decodes are skipped: they are past the prompt).

Each position is produced once:
- chunked prefill: each chunk gives its own positions; the output processor appends them in order;
- preemption: a recomputed prompt does not produce again what it produced before its preemption
  (the planner remembers, per sequence, how far it got: a weak reference, so a finished sequence
  needs no clean-up);
- prefix caching: positions served from the cache are never computed, so a request that asks for
  prompt logprobs does not read the prefix cache (BlockManager finds no hit for it; vLLM's
  SamplingParams.skip_reading_prefix_cache, which defaults to `prompt_logprobs is not None`). Its
  blocks are still cached for the requests after it.

Memory: the logits of the asking rows are taken SLICE_BYTES of float32 at a time ([rows, vocab],
~340 rows of a 49k vocabulary), so a long prompt chunk never holds all its logits at once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from fusecc.runtime.scheduler import ScheduledSequence
from fusecc.runtime.sequence import Sequence

SLICE_BYTES = 64 << 20


@dataclass
class PromptLogprobsSpan:
    """Positions [first_position, first_position + count) of one sequence, at hidden-state rows
    [first_row, first_row + count) of this step; their targets are the prompt tokens after them."""

    seq: Sequence
    first_row: int
    first_position: int
    count: int

    @property
    def first_target(self) -> int:
        """Index in the prompt of the first token whose log-probability the span gives."""
        return self.first_position + 1

    @property
    def target_ids(self) -> list[int]:
        return self.seq.prompt_token_ids[self.first_target:self.first_target + self.count]


@dataclass
class PromptLogprobs:
    """One step's prompt logprobs, every span's rows concatenated in span order (N rows)."""

    spans: list[PromptLogprobsSpan]
    logprobs: torch.Tensor  # [N] float32: of each span's prompt tokens
    ranks: torch.Tensor  # [N] int64: 1 + tokens more likely than the prompt token
    top_logprobs: torch.Tensor | None  # [N, K] float32, descending; K = the largest prompt_logprobs asked
    top_token_ids: torch.Tensor | None  # [N, K] int64


class PromptLogprobsPlanner:
    def __init__(self) -> None:
        # sequence -> prompt positions whose logprobs were produced ([0, n)); survives preemption
        self._done: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()

    def plan(self, entries: list[ScheduledSequence], cu_seqlens_q: list[int],
             num_decodes: int) -> list[PromptLogprobsSpan]:
        """The spans this step computes, and mark them produced. entries: the step's schedule
        (decodes first); cu_seqlens_q[i]: the first hidden-state row of entries[i]."""
        spans = []
        for i in range(num_decodes, len(entries)):
            e = entries[i]
            seq = e.seq
            if seq.sampling_params.prompt_logprobs is None:
                continue
            done = self._done.get(seq, 0)
            lo = max(e.start, done)
            hi = min(e.start + e.num_new_tokens, seq.num_prompt_tokens - 1)
            if hi <= lo:
                continue
            assert e.start <= done, (f"{seq.request_id}: prompt positions [{done}, {e.start}) were never computed "
                                     f"(a prefix-cache hit on a request that asks for prompt logprobs)")
            spans.append(PromptLogprobsSpan(seq, cu_seqlens_q[i] + lo - e.start, lo, hi - lo))
            self._done[seq] = hi
        return spans


def compute_prompt_logprobs(spans: list[PromptLogprobsSpan], hidden: torch.Tensor,
                            compute_logits: Callable[[torch.Tensor], torch.Tensor], vocab_size: int,
                            to_device: Callable[[list[int], torch.dtype], torch.Tensor]) -> PromptLogprobs | None:
    """log_softmax of the logits at the spans' rows of `hidden` ([T, hidden_size]); None without spans.
    compute_logits: the model's head ([n, hidden_size] -> [n, vocab_size] float32); to_device: a
    host list of ints as a tensor on hidden's device."""
    if not spans:
        return None
    rows = to_device([r for s in spans for r in range(s.first_row, s.first_row + s.count)], torch.int64)
    targets = to_device([t for s in spans for t in s.target_ids], torch.int64)
    k = max(s.seq.sampling_params.prompt_logprobs for s in spans)
    step = max(1, SLICE_BYTES // (4 * vocab_size))
    parts = []
    for lo in range(0, rows.shape[0], step):
        lp = compute_logits(hidden[rows[lo:lo + step]]).float().log_softmax(dim=-1)  # [m, vocab]
        token_lp = lp.gather(1, targets[lo:lo + step, None]).squeeze(1)
        ranks = (lp > token_lp[:, None]).sum(dim=-1) + 1
        parts.append((token_lp, ranks, lp.topk(k, dim=-1) if k else None))
    return PromptLogprobs(
        spans=spans,
        logprobs=torch.cat([p[0] for p in parts]),
        ranks=torch.cat([p[1] for p in parts]),
        top_logprobs=torch.cat([p[2].values for p in parts]) if k else None,
        top_token_ids=torch.cat([p[2].indices for p in parts]) if k else None)
