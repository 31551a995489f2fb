"""Async scheduling: the host prepares step N+1 while the device runs step N (vLLM's async
scheduling, EngineConfig.async_scheduling).

A synchronous step leaves the device idle while the host schedules, prepares inputs, reads the
sampled tokens back and detokenizes (about 0.8 ms of a 2.1 ms batch-1 decode step of a 1B Llama
on an H100). With async scheduling the engine's step is:

    out = scheduler.schedule()            # a sequence whose last token is pending counts it as known
    if can_launch_async(out):             # one-token plain-greedy decodes only
        sampled = runner.execute(out, launched=previous)   # pending rows read previous's tokens on the device
        launched = LaunchedStep.launch(out, sampled.token_ids)   # device -> pinned host copy, an event
        scheduler.mark_launched(out)      # positions computed, one more pending token a sequence
    tokens = previous.read_back()         # waits for step N only now, with N+1 already queued
    scheduler.postprocess_launched(previous.output, tokens); detokenize, stop checks, outputs

What a pending token changes (Sequence.num_pending_tokens, a counter: token_ids holds only tokens
read back): the scheduler counts it as the next uncomputed token; a sequence whose pending token
reaches max_tokens or max_model_len is not scheduled again; a block is hashed for the prefix cache
only when every token and KV in it is known; a preempted sequence is re-admitted only after its
token is read back. A sequence that stops at step N (EOS, stop token, stop string, abort) has
computed one token in step N+1 for nothing: it is skipped when N+1 is read back, and its blocks,
freed at N's read-back, are reused only by steps queued after N+1 on the same stream.

Any step that cannot be launched ahead (a prefill chunk, sampling that reads the outputs on the
host: penalties, min_tokens still masking, logprobs, bad words, seeds) waits for the step in flight
and runs synchronously. Speculative decoding and tensor parallelism do not use it. Tokens are the
same as without it; outputs come one step later, so an abort reports one token fewer than a
synchronous engine aborted at the same step would, and a delta stream may carry two tokens in one
output where a step that runs synchronously follows a launched one (the concatenation is the same).
A sequence whose token in flight ends it still takes a slot in the next launched step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusecc.runtime.sampler import is_plain_greedy
from fusecc.runtime.scheduler import SchedulerOutput


def can_launch_async(out: SchedulerOutput) -> bool:
    """Whether a step can run before the previous one's tokens are read back: every entry a
    one-token decode whose sampling is a plain argmax (nothing read from its outputs on the host)."""
    return bool(out.scheduled) and all(
        not e.is_prefill and e.do_sample and e.num_new_tokens == 1 and not e.spec_token_ids
        and is_plain_greedy(e.seq, e.seq.sampling_params) for e in out.scheduled)


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    output: SchedulerOutput
    token_ids: torch.Tensor  # [B] on the device: row i is output.scheduled[i]'s token
    host: torch.Tensor  # [B] on the host, filled by an asynchronous copy (pinned memory on CUDA)
    event: object  # torch.cuda.Event recorded after the copy; None on CPU
    row_of: dict  # Sequence -> its row

    @classmethod
    def launch(cls, output: SchedulerOutput, token_ids: torch.Tensor) -> "LaunchedStep":
        if token_ids.device.type == "cuda":
            host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            host.copy_(token_ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = token_ids, None
        return cls(output, token_ids, host, event, {e.seq: i for i, e in enumerate(output.scheduled)})

    def feed(self, entries: list, rows: list[int], to_device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, their input token ids on the device) for the rows of `entries` whose input is a
        token this step sampled. to_device(list, dtype): the runner's host-to-device copy."""
        sources = [self.row_of[entries[i].seq] for i in rows]
        return to_device(rows, torch.int64), self.token_ids.index_select(0, to_device(sources, torch.int64))

    def read_back(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
