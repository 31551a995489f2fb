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

_SCALARS = frozenset({int, float, bool, str, type(None)})  # compared by value (others: by identity)
_MISSING = object()


@functools.cache
def _derived(cls: type) -> frozenset[str]:
    """cached_property names: recomputed by each replica, never sent."""
    return frozenset(n for c in cls.__mro__ for n, v in vars(c).items() if isinstance(v, functools.cached_property))


class _SentList:
    """What was sent of a list attribute: the list object, its length then and its last entry."""
    __slots__ = ("ref", "n", "last")

    def __init__(self, ref: list, n: int) -> None:
        self.ref, self.n, self.last = ref, n, ref[n - 1] if n else None


@dataclass
class _Sent:
    seq: Sequence
    values: dict  # attribute -> the value sent last (lists: a _SentList)


class StepEncoder:
    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, out: SchedulerOutput, eos_token_ids) -> tuple:
        """(entries, drops, eos): an entry per scheduled sequence, (request_id, new, sets, appends,
        start, num_new_tokens, is_prefill, do_sample, slot_mapping), sets {attribute: value} and
        appends {list attribute: entries appended}; drops: request ids the replicas forget."""
        encode_seq, sent = self._encode_seq, self._sent
        entries = [encode_seq(e.seq) + (e.start, e.num_new_tokens, e.is_prefill, e.do_sample, e.slot_mapping)
                   for e in out.scheduled]
        drops = []
        if len(sent) > len(entries):  # else every replica is scheduled: none to drop (the usual step)
            scheduled = {e.seq.request_id for e in out.scheduled}
            drops = [rid for rid, s in sent.items() if rid not in scheduled and s.seq.is_finished]
            for rid in drops:
                del sent[rid]
        return entries, drops, tuple(eos_token_ids)

    def _encode_seq(self, seq: Sequence) -> tuple:
        # Per attribute, cheapest test first: a value that is the object sent last is unchanged (a
        # list never is: its _SentList stands for it); lists are checked for appends; scalars by value.
        rid = seq.request_id
        sent = self._sent.get(rid)
        new = sent is None or sent.seq is not seq
        if new:
            sent = self._sent[rid] = _Sent(seq, {})
        skip, last, sets, appends = _derived(type(seq)), sent.values, {}, {}
        for name, value in vars(seq).items():
            previous = last.get(name, _MISSING)
            if previous is value or name in skip:
                continue
            if isinstance(value, list):
                n = len(value)
                if type(previous) is _SentList and previous.ref is value:
                    m = previous.n
                    if m <= n and (m == 0 or value[m - 1] == previous.last):
                        if n > m:  # grown: only the new entries
                            appends[name] = value[m:]
                            previous.n, previous.last = n, value[-1]
                        continue
                sets[name] = list(value)  # new, replaced, shrunk or rewritten: whole
                last[name] = _SentList(value, n)
            elif previous is _MISSING or not (type(value) is type(previous) and type(value) in _SCALARS
                                              and previous == value):
                sets[name] = value
                last[name] = value
        return rid, new, sets, appends


class StepDecoder:
    def __init__(self) -> None:
        self._replicas: dict[str, Sequence] = {}

    def decode(self, message: tuple) -> tuple[SchedulerOutput, tuple]:
        entries, drops, eos = message
        replicas = self._replicas
        for rid in drops:
            replicas.pop(rid, None)
        scheduled = []
        for rid, new, sets, appends, start, num_new, is_prefill, do_sample, slots in entries:
            if new:
                replica = replicas[rid] = Sequence.__new__(Sequence)
            else:
                replica = replicas[rid]
            state = vars(replica)
            if sets:
                state.update(sets)
            for name, tail in appends.items():
                state[name].extend(tail)
            scheduled.append(ScheduledSequence(replica, start, num_new, is_prefill, do_sample, slots))
        return SchedulerOutput(scheduled=scheduled), eos
