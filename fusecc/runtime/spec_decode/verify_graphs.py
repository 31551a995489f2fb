"""CUDA graphs of verification steps (b sequences x (k + 1) query tokens, one graph per batch bucket)
and of draft decode steps (StepGraphs with q = 1 over a draft's forward and KV pool).

The decode graphs (model_runner.py) cannot serve a verification: they bake in one query token per
sequence. A verification step gets its own graphs, captured at start-up for the buckets 1, 2, 4, ...
up to disable_by_batch_size (speculation is off above it).

Attention runs as a decode over the step's b * (k + 1) rows: row i of a sequence whose verified
tokens start at position c is a one-token "sequence" of context length c + i + 1 over its sequence's
block table (repeated per row), which is exactly causal attention within the window. Every token's
K/V is written first (one write_kv_cache per layer, as in any step), so row i reads the drafts
before it. The decode kernel splits long contexts across programs; the paged prefill kernel, which
a (k + 1)-token query would otherwise take, runs one program per sequence and head that walks the
whole context alone, the step's longest kernel at batch 1.

A step is replayed when every entry is a decode verifying 0..k drafts (no prefill chunk): each
sequence is padded to k + 1 rows. Pad rows write nothing (slot -1) and sit after the real rows of
their sequence, so no real row reads them; a pad row reuses its sequence's last real position
(inside the rotary table) and reads up to k positions past the real ones, garbage that nothing uses
(the block tables are wider than max_blocks_per_seq by the blocks those positions can reach, so a
lookup stays inside the row). The rows of an empty bucket slot read positions 0..q - 1 of block 0
(valid reads, no empty row; their output is unused). The real rows' hidden states are gathered
back into the flat step layout.
"""

from __future__ import annotations

import logging
import time

import torch

from fusecc.cuda_graph import CapturedCall
from fusecc.runtime.input_batch import StepInputs, cdiv
from fusecc.runtime.models.attention import AttentionMetadata

logger = logging.getLogger(__name__)


class StepGraphs:
    """CUDA graphs of `forward` on b sequences x q query tokens each (b a bucket up to max_batch),
    attention as a decode over the b * q rows (the module docstring)."""

    def __init__(self, forward, kv_caches: list, runner, q: int, max_batch: int, extra_blocks: int = 0) -> None:
        from fusecc.runtime.model_runner import graph_buckets

        self.forward, self.kv_caches, self.runner, self.q = forward, kv_caches, runner, q
        self.buckets = graph_buckets(min(max_batch, runner.config.max_num_seqs))
        self.max_batch = self.buckets[-1]
        self.num_replays = 0
        n, dev = self.max_batch, runner.device
        self.width = runner.max_blocks_per_seq + extra_blocks
        with torch.inference_mode():  # as execute()'s inputs: a compiled graph guards on dispatch keys
            self.static = dict(
                input_ids=torch.zeros(n * q, dtype=torch.int64, device=dev),
                positions=torch.zeros(n * q, dtype=torch.int64, device=dev),
                slots=torch.full((n * q,), -1, dtype=torch.int64, device=dev),
                # per row: its context length and its sequence's block table
                context_lens=torch.arange(1, q + 1, dtype=torch.int32, device=dev).repeat(n),
                block_tables=torch.zeros((n * q, self.width), dtype=torch.int32, device=dev),
                cu=torch.arange(n * q + 1, dtype=torch.int32, device=dev))
            self.graphs: dict[int, CapturedCall] = {}
            start = time.perf_counter()
            pool = torch.cuda.graph_pool_handle()
            for b in reversed(self.buckets):
                args = self._args(b)
                for _ in range(2):  # compile / autotune outside the capture
                    forward(*args)
                self.graphs[b] = CapturedCall(forward, args, pool)
            torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs of %d-token steps in %.1f s", len(self.buckets), q,
                    time.perf_counter() - start)

    def _args(self, b: int) -> tuple:
        s, q = self.static, self.q
        T = b * q
        md = AttentionMetadata(slot_mapping=s["slots"][:T], block_tables=s["block_tables"][:T],
                               context_lens=s["context_lens"][:T], cu_seqlens_q=s["cu"][:T + 1],
                               max_seqlen_q=1, decode_only=True, num_decodes=T)
        return (s["input_ids"][:T], s["positions"][:T], self.kv_caches, md)

    def run(self, ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: torch.Tensor) -> torch.Tensor:
        """Replay on B = len(context_lens) sequences of q tokens each (lists of B * q; block_tables
        [B, width'] CPU int32); returns the bucket's hidden states [b * q, hidden] (valid until
        the next replay)."""
        B, q = len(context_lens), self.q
        b = next(x for x in self.buckets if x >= B)
        empty = (b - B) * q
        dev = self.runner._device
        # row i of a sequence of context length c (its q tokens included) sees c - q + 1 + i positions;
        # empty bucket slots: q tokens at positions 0..q-1 over a zero block table, writing nothing
        row_context = [c - q + 1 + i for c in context_lens for i in range(q)] + list(range(1, q + 1)) * (b - B)
        packed = dev(ids + [0] * empty + positions + list(range(q)) * (b - B) + slots + [-1] * empty + row_context,
                     torch.int64)
        s, T = self.static, b * q
        s["input_ids"][:T].copy_(packed[:T])
        s["positions"][:T].copy_(packed[T:2 * T])
        s["slots"][:T].copy_(packed[2 * T:3 * T])
        s["context_lens"][:T].copy_(packed[3 * T:])
        tables = dev(block_tables, torch.int32)
        s["block_tables"][:T].zero_()
        s["block_tables"][:B * q].view(B, q, self.width)[:, :, :tables.shape[1]].copy_(tables[:, None, :])
        self.num_replays += 1
        return self.graphs[b].replay()


class VerifyGraphs(StepGraphs):
    def __init__(self, runner, k: int, max_batch: int) -> None:
        self.k = k
        super().__init__(runner.forward, runner.kv_caches, runner, k + 1, max_batch,
                         extra_blocks=cdiv(k, runner.config.block_size) + 1)

    def fits(self, entries: list) -> bool:
        return len(entries) <= self.max_batch and all(
            not e.is_prefill and len(e.spec_token_ids) <= self.k for e in entries)

    def replay(self, entries: list, inputs: StepInputs) -> torch.Tensor:
        """The step's hidden states [T, hidden] in the flat layout of `inputs` (T = its tokens)."""
        q = self.q
        ids, pos, slots, ctx, rows = [], [], [], [], []
        for i, e in enumerate(entries):
            n = e.num_new_tokens  # 1 + its drafts
            lo = inputs.cu_seqlens_q[i]
            pad = q - n
            ids += inputs.token_ids[lo:lo + n] + [0] * pad
            last = inputs.positions[lo + n - 1]
            pos += inputs.positions[lo:lo + n] + [last] * pad
            slots += inputs.slot_mapping[lo:lo + n] + [-1] * pad
            ctx.append(e.start + q)
            rows += range(i * q, i * q + n)
        hidden = self.run(ids, pos, slots, ctx, inputs.block_tables)
        return hidden[self.runner._device(rows, torch.int64)]
