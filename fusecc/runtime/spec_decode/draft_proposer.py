"""Model drafts: a small model (or the target's first layers) proposes k tokens autoregressively.

    proposer = DraftModelProposer(model, forward, kv_caches, block_manager, shares_target_kv=False)
    draft_probs = proposer.propose(entries, eos_token_ids)   # fills each entry's spec_token_ids in place

Runs after Scheduler.schedule(), when every entry that verifies k drafts owns the cache slots of
positions c..c+k (c = the position of its last sampled token, whose KV is not computed yet). The
draft writes its own K/V at the same slots (the target's block tables index both pools):
- step 0: the draft's missing positions [dc, c] of each sequence in one forward (dc: how far its
  draft KV is valid; a first proposal catches up the whole prompt), logits of position c -> d_1;
- step i = 1..k-1: d_i at position c + i (decode-shaped) -> d_{i+1}.
After verification the draft KV is valid through min(c + k, the target's num_computed_tokens): the
accepted drafts are the tokens it was computed from; later positions are rewritten next time.
A preempted sequence gets a new block table (BlockManager.free / allocate install a new list),
which resets its draft KV to nothing valid.

layer_skip (`LayerSkipModel`): the draft is the target's first L layers and its head, and its KV
pool is the target's first L layers' pool. Those layers compute the same K/V for a position
whatever runs after them, so the target's KV of every computed position is the draft's (dc = c
always) and the draft's writes at c..c+k-1 are what the verifying forward writes again.

Greedy rows propose the draft's argmax; sampled rows draw from the draft's processed
distribution (SamplingParams applied as the Sampler does), which is returned per sequence
([k, V]) for the rejection sampler.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fusecc.runtime.input_batch import cdiv
from fusecc.runtime.models.attention import AttentionMetadata
from fusecc.runtime.sampler import Sampler, SamplingMetadata
from fusecc.runtime.sequence import SequenceStatus
from fusecc.runtime.spec_decode.rejection_sampler import DRAFT_SALT, DraftRow


class LayerSkipModel(nn.Module):
    """The first `num_layers` decoder layers of a fusecc model, then its final norm; its head is the target's."""

    def __init__(self, target: nn.Module, num_layers: int) -> None:
        super().__init__()
        inner = getattr(target, "model", None)
        if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
            raise ValueError(f"speculative_config method 'layer_skip' needs a fusecc model class (embed_tokens, "
                             f"layers, norm); {type(target).__name__} has none")
        if not 1 <= num_layers < len(inner.layers):
            raise ValueError(f"speculative_config.num_layers must be in [1, {len(inner.layers) - 1}] "
                             f"(the target has {len(inner.layers)} layers), got {num_layers}")
        self.target, self.num_layers = target, num_layers
        self.config = target.config

    def forward(self, input_ids, positions, kv_caches, md: AttentionMetadata) -> torch.Tensor:
        inner = self.target.model
        x = inner.embed_tokens(input_ids)  # [T, hidden]
        for layer, kv_cache in zip(inner.layers[:self.num_layers], kv_caches):
            x = layer(x, positions, kv_cache, md)
        return inner.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)


class DraftModelProposer:
    def __init__(self, model: nn.Module, forward, kv_caches: list, block_manager, *, shares_target_kv: bool,
                 seed: int | None) -> None:
        """model: has compute_logits and config.vocab_size; forward: its (compiled) forward;
        kv_caches: the draft's per-layer (k, v) pools, [num_blocks, block_size, kv_heads, head_dim]."""
        self.model, self.forward, self.kv_caches = model, forward, kv_caches
        # one draft step's cost in target forwards (the builder sets it: layers or parameters ratio)
        self.draft_cost = 0.0
        self.block_manager = block_manager
        self.shares_target_kv = shares_target_kv
        self.vocab_size = model.config.vocab_size
        self.device = kv_caches[0][0].device
        self.sampler = Sampler(seed=None if seed is None else seed + 1)
        # CUDA graphs of the draft's decode-shaped steps (verify_graphs.StepGraphs, q = 1), set on CUDA
        self.graphs = None
        # seq -> (the block table list its draft KV was written under, end of the positions written)
        self._written: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def num_valid(self, seq) -> int:
        """Leading positions of `seq` whose draft KV is valid."""
        if self.shares_target_kv:
            return seq.num_computed_tokens
        state = self._written.get(seq)
        if state is None or state[0] is not seq.block_table:
            return 0
        return min(state[1], seq.num_computed_tokens)

    @torch.inference_mode()
    def propose(self, entries: list, eos_token_ids=()) -> dict:
        """entries: ScheduledSequences whose spec_token_ids hold k placeholders each; filled in place.
        Returns {seq: [k, V] float32 draft distribution} for sequences that sample (not greedy)."""
        if not entries:
            return {}
        bm = self.block_manager
        drafts: list[list[int]] = [[] for _ in entries]
        probs: list[list[torch.Tensor]] = [[] for _ in entries]
        # step 0: catch-up positions [dc, c] and the last sampled token
        tokens, positions, slots, ctx, cu = [], [], [], [], [0]
        for e in entries:
            c = e.start
            # an abort between schedule() and now (another thread) frees the blocks: no catch-up then
            running = e.seq.status is SequenceStatus.RUNNING
            dc = min(self.num_valid(e.seq), c) if running else c
            tokens += e.seq.token_ids[dc:c + 1]
            positions += range(dc, c + 1)
            slots += (bm.slot_mapping(e.seq, dc, c) if dc < c else []) + [e.slot_mapping[0]]
            ctx.append(c + 1)
            cu.append(cu[-1] + c + 1 - dc)
        last_rows = [r - 1 for r in cu[1:]]
        self._step(entries, list(range(len(entries))), tokens, positions, slots, ctx, cu, last_rows, drafts, probs,
                   eos_token_ids)
        for i in range(1, max(len(e.spec_token_ids) for e in entries)):
            active = [j for j, e in enumerate(entries) if len(e.spec_token_ids) > i]
            sub = [entries[j] for j in active]
            self._step(sub, active, [drafts[j][-1] for j in active], [e.start + i for e in sub],
                       [e.slot_mapping[i] for e in sub], [e.start + i + 1 for e in sub], list(range(len(sub) + 1)),
                       list(range(len(sub))), drafts, probs, eos_token_ids)
        out = {}
        for j, e in enumerate(entries):
            e.spec_token_ids[:] = drafts[j]
            if probs[j]:
                out[e.seq] = torch.stack(probs[j])
            if not self.shares_target_kv:
                self._written[e.seq] = (e.seq.block_table, e.start + len(drafts[j]))
        return out

    def _step(self, sub: list, index: list[int], tokens, positions, slots, ctx, cu, sample_rows, drafts, probs,
              eos_token_ids) -> None:
        """One draft forward over `sub` (entries; index: their places in drafts/probs); appends a draft to each."""
        dev = self.device
        bs = self.block_manager.block_size
        width = cdiv(max(ctx), bs)
        tables = torch.zeros((len(sub), width), dtype=torch.int32)
        for r, e in enumerate(sub):
            table = e.seq.block_table[:width]
            tables[r, :len(table)] = torch.tensor(table, dtype=torch.int32)
        decode_only = len(tokens) == len(sub)
        graphs = self.graphs
        if decode_only and graphs is not None and len(sub) <= graphs.max_batch:
            hidden = graphs.run(tokens, positions, slots, ctx, tables)[:len(sub)]
        else:
            hidden = self._eager_forward(tokens, positions, slots, ctx, cu, tables, decode_only, len(sub))
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.int64, device=dev)])
        rows = [DraftRow(e.seq, drafts[j]) for e, j in zip(sub, index)]
        smd = SamplingMetadata.build(rows, vocab_size=self.vocab_size, device=dev, eos_token_ids=eos_token_ids)
        if smd.plain_greedy:
            chosen = logits.argmax(dim=-1).tolist()
        else:
            penalized = self.sampler.penalize(logits, smd)
            if smd.all_greedy:
                chosen = penalized.argmax(dim=-1).tolist()
            else:
                q = self.sampler.truncate(penalized, smd).softmax(dim=-1)  # [B, V]
                smd.step_seeds = [None if s is None else s ^ DRAFT_SALT for s in smd.step_seeds]
                sampled = self.sampler.sample(q, smd)
                chosen = torch.where(smd.greedy, penalized.argmax(dim=-1), sampled).tolist()
                for r, j in enumerate(index):
                    if not rows[r].sampling_params.is_greedy:
                        probs[j].append(q[r])
        for r, j in enumerate(index):
            drafts[j].append(int(chosen[r]))

    def _eager_forward(self, tokens, positions, slots, ctx, cu, tables, decode_only: bool, num_seqs: int):
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev), block_tables=tables.to(dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])), decode_only=decode_only,
            num_decodes=num_seqs if decode_only else 0)
        return self.forward(torch.tensor(tokens, dtype=torch.int64, device=dev),
                            torch.tensor(positions, dtype=torch.int64, device=dev), self.kv_caches, md)
