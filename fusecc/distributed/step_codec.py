"""A step (SchedulerOutput) as a small message for the worker ranks, and back.

Pickling the scheduled Sequence objects whole each step costs O(tokens of every running
sequence) (256 sequences of 600 tokens: ~2 MB a step). Instead the engine side keeps what it has
sent of each sequence and sends only what changed; each rank keeps a replica per sequence and
applies the changes, so the model runner sees the same attribute values (and stable objects,
which its block-table mirror relies on):

    message = encoder.encode(out, eos_ids)     # engine / rank 0 side
    out, eos_ids = decoder.decode(message)      # every rank: replicas in ScheduledSequence entries

Per sequence attribute: a list is sent whole the first time, then as the entries appended since
(the same list object, not shrunk, its last sent entry unchanged: token_ids, block_table and
block_hashes only grow between reinstalls), else whole again; any other value is sent when it is
not the one sent last. A sequence is new to the ranks the first time it is scheduled (or when its
id comes back as another object), and dropped from the replicas once it has finished.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fusecc.runtime.scheduler import ScheduledSequence, SchedulerOutput
from fusecc.runtime.sequence import Sequence

_SCALARS = (int, float, bool, str, type(None))


@functools.cache
def _derived(cls: type) -> frozenset[str]:
    """cached_property names: recomputed by each replica, never sent."""
    return frozenset(n for c in cls.__mro__ for n, v in vars(c).items() if isinstance(v, functools.cached_property))


@dataclass
class _Sent:
    seq: Sequence
    values: dict  # attribute -> the value sent last (lists: (list object, length sent, last entry))


class StepEncoder:
    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, out: SchedulerOutput, eos_token_ids) -> tuple:
        scheduled = {e.seq.request_id for e in out.scheduled}
        drops = [rid for rid, s in self._sent.items() if rid not in scheduled and s.seq.is_finished]
        for rid in drops:
            del self._sent[rid]
        entries = []
        for e in out.scheduled:
            entries.append((self._encode_seq(e.seq), e.start, e.num_new_tokens, e.is_prefill, e.do_sample,
                            e.slot_mapping))
        return entries, drops, tuple(eos_token_ids)

    def _encode_seq(self, seq: Sequence) -> tuple:
        sent = self._sent.get(seq.request_id)
        new = sent is None or sent.seq is not seq
        if new:
            sent = self._sent[seq.request_id] = _Sent(seq, {})
        skip, last, changes = _derived(type(seq)), sent.values, {}
        for name, value in vars(seq).items():
            if name in skip:
                continue
            if isinstance(value, list):
                previous = last.get(name)
                n = len(value)
                if (previous is not None and previous[0] is value and previous[1] <= n
                        and (previous[1] == 0 or value[previous[1] - 1] == previous[2])):
                    if n > previous[1]:
                        changes[name] = ("+", value[previous[1]:])
                else:
                    changes[name] = ("=", list(value))
                last[name] = (value, n, value[-1] if n else None)
            elif name not in last or last[name] is not value and not (
                    isinstance(value, _SCALARS) and type(last[name]) is type(value) and last[name] == value):
                changes[name] = ("=", value)
                last[name] = value
        return seq.request_id, new, changes


class StepDecoder:
    def __init__(self) -> None:
        self._replicas: dict[str, Sequence] = {}

    def decode(self, message: tuple) -> tuple[SchedulerOutput, tuple]:
        entries, drops, eos = message
        for rid in drops:
            self._replicas.pop(rid, None)
        scheduled = []
        for (rid, new, changes), start, num_new, is_prefill, do_sample, slots in entries:
            if new:
                self._replicas[rid] = Sequence.__new__(Sequence)
            replica = self._replicas[rid]
            state = vars(replica)
            for name, (kind, value) in changes.items():
                if kind == "+":
                    state[name].extend(value)
                else:
                    state[name] = value
            scheduled.append(ScheduledSequence(replica, start, num_new, is_prefill, do_sample, slots))
        return SchedulerOutput(scheduled=scheduled), eos
