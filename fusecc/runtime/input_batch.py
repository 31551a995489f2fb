"""A step's flat model inputs, built on the host with C-level conversions.

    mirror = BlockTableMirror(num_rows=2 * max_num_seqs, max_blocks=max_blocks_per_seq)
    inputs = prepare_inputs(scheduler_output.scheduled, mirror, block_size)
    inputs.token_ids, inputs.positions, inputs.slot_mapping      # [T] lists, T new tokens
    inputs.context_lens, inputs.cu_seqlens_q                      # [B], [B + 1] lists
    inputs.block_tables                                           # [B, width] int32 CPU tensor

At ~256 running sequences the per-step Python cost is what bounds decode throughput, so nothing
here is O(sequences x blocks per sequence): block tables are mirrored incrementally (a decode
step writes the ~B / block_size blocks that were appended since the last step) and gathered
with one index_select; lists become tensors through `array` + `torch.frombuffer` (~4x faster
than `torch.tensor` on Python ints).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from fusecc.runtime.scheduler import ScheduledSequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cpu_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """A fresh CPU tensor of a list of ints (int64 or int32)."""
    if not len(values):
        return torch.empty(0, dtype=dtype)
    code = {torch.int64: "q", torch.int32: "i"}[dtype]
    return torch.frombuffer(array(code, values), dtype=dtype)


class BlockTableMirror:
    """int32 copies of the block tables of recently scheduled sequences, one row each.

    A sequence's table (a list owned by BlockManager) only grows between `allocate` and `free`,
    and each of those installs a new list object; so a row is valid while it was written from
    the same list object, and only the entries past `written` are new. A row's entries past its
    table's length are 0 (rows are padded like the tables the kernels expect). Rows of sequences
    not in the current step are recycled when rows run out; such a sequence gets a fresh row,
    fully written, when it is scheduled again.
    """

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        assert num_rows >= 1 and max_blocks >= 1, (num_rows, max_blocks)
        self.num_rows, self.max_blocks = num_rows, max_blocks
        self._buf = array("i", bytes(4 * num_rows * max_blocks))  # never resized: the view below shares it
        self.table = torch.frombuffer(self._buf, dtype=torch.int32).view(num_rows, max_blocks)
        self._rows: dict[object, list] = {}  # sequence -> [row, the table list it mirrors, entries written]
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def rows(self, seqs: list) -> list[int]:
        """The row of each sequence (anything with a .block_table list), updated to its current table."""
        assert len(seqs) <= self.num_rows, (len(seqs), self.num_rows)
        rows_of, buf, mb = self._rows, self._buf, self.max_blocks
        if len(self._free_rows) < len(seqs):
            keep = set(seqs)
            for seq in [s for s in rows_of if s not in keep]:
                row, _, written = rows_of.pop(seq)
                buf[row * mb:row * mb + written] = array("i", bytes(4 * written))  # a free row is all 0
                self._free_rows.append(row)
        out = []
        for seq in seqs:
            table = seq.block_table
            n = len(table)
            entry = rows_of.get(seq)
            if entry is None:
                entry = rows_of[seq] = [self._free_rows.pop(), table, 0]
            row, mirrored, written = entry
            base = row * mb
            # Same list object, not shrunk, last mirrored entry unchanged: only appends since.
            if mirrored is not table or written > n or (written and buf[base + written - 1] != table[written - 1]):
                assert n <= mb, (n, mb)
                buf[base:base + written] = array("i", bytes(4 * written))  # keep the padding 0
                entry[1], entry[2], written = table, 0, 0
            if n > written:
                assert n <= mb, (n, mb)
                if n - written == 1:
                    buf[base + written] = table[written]
                else:
                    buf[base + written:base + n] = array("i", table[written:n])
                entry[2] = n
            out.append(row)
        return out

    def gather(self, rows: list[int], width: int) -> torch.Tensor:
        """[len(rows), width] int32, a fresh tensor: the rows' tables, cut or 0-padded to width."""
        return self.table[:, :width].index_select(0, cpu_tensor(rows, torch.int64))


@dataclass
class StepInputs:
    token_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T]
    context_lens: list[int]  # [B]
    cu_seqlens_q: list[int]  # [B + 1]
    block_tables: torch.Tensor  # [B, width] int32 (CPU), rows 0-padded
    # Rows of the hidden states whose logits are sampled, in order; None when every row is
    # (a decode-only step where every entry samples: no gather needed).
    sample_rows: list[int] | None
    num_sampled: int
    max_seqlen_q: int
    decode_only: bool  # one new token per sequence (T == B)
    num_decodes: int  # entries that are decodes (they come first)
    # draft tokens verified this step (speculative decoding); their entries sample 1 + drafts rows each
    num_spec_tokens: int = 0
    # async scheduling: rows whose input token is pending (sampled by the launched step before, not
    # read back): token_ids holds 0 there, and the runner copies the token in on the device
    pending_rows: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


def prepare_inputs(entries: list[ScheduledSequence], mirror: BlockTableMirror, block_size: int) -> StepInputs:
    B = len(entries)
    assert B, "a step needs at least one scheduled sequence"
    num_spec_tokens = 0
    if all(e.num_new_tokens == 1 for e in entries):
        # Decode-shaped step: one token per entry (decodes, and 1-token prompt chunks).
        positions = [e.start for e in entries]
        # a row whose input is past the tokens read back takes the pending token (async scheduling)
        pending_rows = [i for i, e in enumerate(entries) if e.start == len(e.seq.token_ids)] or None
        if pending_rows is None:
            token_ids = [e.seq.token_ids[e.start] for e in entries]
        else:
            token_ids = [e.seq.token_ids[e.start] if e.start < len(e.seq.token_ids) else 0 for e in entries]
        slots = [e.slot_mapping[0] for e in entries]
        context_lens = [p + 1 for p in positions]
        cu = list(range(B + 1))
        sampled = [e.do_sample for e in entries]
        sample_rows = None if all(sampled) else [i for i, s in enumerate(sampled) if s]
        num_sampled = B if sample_rows is None else len(sample_rows)
        max_seqlen_q = 1
    else:
        pending_rows = None
        token_ids, positions, slots, context_lens, cu, sample_rows = [], [], [], [], [0], []
        max_seqlen_q = 0
        for e in entries:
            start, n = e.start, e.num_new_tokens
            end = start + n
            positions += range(start, end)
            slots += e.slot_mapping
            context_lens.append(end)
            cu.append(cu[-1] + n)
            if e.spec_token_ids:  # a decode verifying drafts: the logits of all its tokens
                token_ids += e.token_ids
                sample_rows += range(cu[-2], cu[-1])
                num_spec_tokens += len(e.spec_token_ids)
                continue
            assert end <= len(e.seq.token_ids), (e.seq.request_id, end)  # a pending token only in decode steps
            token_ids += e.seq.token_ids[start:end]
            if e.do_sample:
                sample_rows.append(cu[-1] - 1)
            if n > max_seqlen_q:
                max_seqlen_q = n
        num_sampled = len(sample_rows)
    assert len(token_ids) == len(positions) == len(slots) == cu[-1], (len(token_ids), len(slots), cu[-1])
    width = cdiv(max(context_lens), block_size)
    block_tables = mirror.gather(mirror.rows([e.seq for e in entries]), width)
    return StepInputs(token_ids=token_ids, positions=positions, slot_mapping=slots, context_lens=context_lens,
                      cu_seqlens_q=cu, block_tables=block_tables, sample_rows=sample_rows, num_sampled=num_sampled,
                      max_seqlen_q=max_seqlen_q, decode_only=len(token_ids) == B,
                      num_decodes=sum(not e.is_prefill for e in entries), num_spec_tokens=num_spec_tokens,
                      pending_rows=pending_rows)
