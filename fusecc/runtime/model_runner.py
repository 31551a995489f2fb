"""Runs one scheduled step on the device: flat inputs -> forward -> logits -> sampled tokens.

    runner = ModelRunner(model, config, device)          # sizes and allocates the KV pool
    config = runner.config                                 # num_kv_blocks resolved
    sampled = runner.execute(scheduler_output, eos_ids)    # SamplerOutput (None if nothing samples)

The forward is `torch.compile(model, backend="fusecc", options={"freeze": True}, dynamic=True)`
(one graph for decode-only steps and one for mixed steps, dynamic over the token count) unless
`enforce_eager`. On CUDA, decode-only steps of up to max_num_seqs sequences replay CUDA graphs
captured for batch-size buckets (1, 2, 4, 8, 16, 32, ...); a batch is padded to its bucket with
slot -1 (no cache write) and context length 0 (attention output 0) rows.
"""

from __future__ import annotations

import dataclasses

import torch

from fusecc.runtime.config import EngineConfig
from fusecc.runtime.models.attention import AttentionMetadata
from fusecc.runtime.sampler import Sampler, SamplerOutput, SamplingMetadata
from fusecc.runtime.scheduler import SchedulerOutput

CPU_DEFAULT_KV_BLOCKS = 512
# GPU memory kept out of the KV pool for what the profiling pass does not see: CUDA graphs,
# the sampler's temporaries (a few [max_num_seqs, vocab] fp32 copies), allocator slack.
GPU_RESERVE_BYTES = 512 << 20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def graph_buckets(max_num_seqs: int) -> list[int]:
    buckets, b = [], 1
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_seqs]


def _no_duck_sizing(fn):
    """Without duck sizing, equal sizes that are equal by coincidence (a batch of 8 sequences and
    8 kv heads) do not become guards, each of which would cost a recompile when broken."""
    import torch.fx.experimental._config as fx_config

    def call(*args):
        with fx_config.patch(use_duck_shape=False):
            return fn(*args)
    return call


class ModelRunner:
    def __init__(self, model, config: EngineConfig, device: torch.device, enforce_eager: bool = False) -> None:
        self.model, self.device = model, torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.num_layers = len(model.model.layers)
        self.kv_heads, self.head_dim = model.kv_shape
        self.vocab_size = model.config.vocab_size
        self.max_blocks_per_seq = cdiv(config.max_model_len, config.block_size)
        self.forward = model if enforce_eager else _no_duck_sizing(torch.compile(
            model, backend="fusecc", options={"freeze": True}, dynamic=True))
        if config.num_kv_blocks is None:
            num_blocks = self._profile_num_blocks(config) if self.device.type == "cuda" else max(
                CPU_DEFAULT_KV_BLOCKS, 2 * self.max_blocks_per_seq)
            config = dataclasses.replace(config, num_kv_blocks=num_blocks)
        self.config = config
        shape = (config.num_kv_blocks, config.block_size, self.kv_heads, self.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
        self.sampler = Sampler(seed=config.seed)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._bucket_of: dict[int, int] = {}  # decode batch size -> captured bucket
        if self.device.type == "cuda" and not enforce_eager:
            self._capture_graphs()

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, eos_token_ids=()) -> SamplerOutput | None:
        entries = out.scheduled
        assert entries, "execute() needs a non-empty schedule"
        token_ids, positions, slots, cu = [], [], [], [0]
        for e in entries:
            token_ids += e.token_ids
            positions += e.positions
            slots += e.slot_mapping
            cu.append(cu[-1] + e.num_new_tokens)
        context_lens = [e.context_len for e in entries]
        sample_rows = [cu[i + 1] - 1 for i, e in enumerate(entries) if e.do_sample]
        decode_only = len(token_ids) == len(entries)
        if decode_only and len(entries) in self._bucket_of:
            hidden = self._replay(token_ids, positions, slots, context_lens, [e.block_table for e in entries])
        else:
            width = max(cdiv(c, self.config.block_size) for c in context_lens)
            tables = [e.block_table[:width] + [0] * (width - len(e.block_table[:width])) for e in entries]
            md = AttentionMetadata(
                slot_mapping=self._tensor(slots, torch.int64), block_tables=self._tensor(tables, torch.int32),
                context_lens=self._tensor(context_lens, torch.int32), cu_seqlens_q=self._tensor(cu, torch.int32),
                max_seqlen_q=max(e.num_new_tokens for e in entries), decode_only=decode_only,
                num_decodes=sum(not e.is_prefill for e in entries))
            hidden = self.forward(self._tensor(token_ids, torch.int64), self._tensor(positions, torch.int64),
                                  self.kv_caches, md)
        if not sample_rows:
            return None
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows, torch.int64)])
        md = SamplingMetadata.build([e.seq for e in entries if e.do_sample], vocab_size=self.vocab_size,
                                    device=self.device, eos_token_ids=eos_token_ids)
        return self.sampler(logits, md)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    # --- KV pool sizing (CUDA) ----------------------------------------------------------------
    def _profile_num_blocks(self, config: EngineConfig) -> int:
        """Run the largest step (max_num_batched_tokens prompt tokens, max_num_seqs logits rows)
        on a scratch cache, then give the KV pool what gpu_memory_utilization leaves."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        bs = config.block_size
        num_tokens = config.max_num_batched_tokens
        seq_len = min(config.max_model_len, num_tokens)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        blocks = [cdiv(n, bs) for n in lens]
        shape = (sum(blocks), bs, self.kv_heads, self.head_dim)
        scratch = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
        scratch_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in scratch)
        tables, first, positions, cu = [], 0, [], [0]
        for n, nb in zip(lens, blocks):
            tables.append(list(range(first, first + nb)) + [0] * (max(blocks) - nb))
            first += nb
            positions += range(n)
            cu.append(cu[-1] + n)
        md = AttentionMetadata(
            slot_mapping=self._tensor(list(range(num_tokens)), torch.int64),
            block_tables=self._tensor(tables, torch.int32), context_lens=self._tensor(lens, torch.int32),
            cu_seqlens_q=self._tensor(cu, torch.int32), max_seqlen_q=max(lens), decode_only=False)
        with torch.inference_mode():
            hidden = self.forward(torch.zeros(num_tokens, dtype=torch.int64, device=self.device),
                                  self._tensor(positions, torch.int64), scratch, md)
            self.model.compute_logits(hidden[:config.max_num_seqs]).softmax(-1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - scratch_bytes
        del scratch, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        budget = total * config.gpu_memory_utilization - peak - non_torch - GPU_RESERVE_BYTES
        per_block = self.num_layers * 2 * bs * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        num_blocks = int(budget // per_block)
        if num_blocks < self.max_blocks_per_seq:
            raise RuntimeError(f"KV pool of {num_blocks} blocks after profiling cannot hold one sequence of "
                               f"max_model_len={config.max_model_len}; raise gpu_memory_utilization or lower "
                               f"max_model_len / max_num_batched_tokens")
        return num_blocks

    # --- CUDA graphs for decode ---------------------------------------------------------------
    def _capture_graphs(self) -> None:
        n = self.config.max_num_seqs
        buckets = graph_buckets(n)
        dev = self.device
        self._static = dict(
            input_ids=torch.zeros(n, dtype=torch.int64, device=dev),
            positions=torch.zeros(n, dtype=torch.int64, device=dev),
            slots=torch.full((n,), -1, dtype=torch.int64, device=dev),
            context_lens=torch.zeros(n, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((n, self.max_blocks_per_seq), dtype=torch.int32, device=dev),
            cu=torch.arange(n + 1, dtype=torch.int32, device=dev),
        )
        self._graph_out: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        s = self._static
        with torch.inference_mode():
            for b in reversed(buckets):  # largest first: the smaller graphs reuse its memory pool
                md = AttentionMetadata(slot_mapping=s["slots"][:b], block_tables=s["block_tables"][:b],
                                       context_lens=s["context_lens"][:b], cu_seqlens_q=s["cu"][:b + 1],
                                       max_seqlen_q=1, decode_only=True, num_decodes=b)
                args = (s["input_ids"][:b], s["positions"][:b], self.kv_caches, md)
                for _ in range(2):  # compile / autotune outside the capture
                    self.forward(*args)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._graph_out[b] = self.forward(*args)
                self.graphs[b] = graph
        torch.cuda.synchronize()
        for size in range(1, n + 1):
            self._bucket_of[size] = next(b for b in buckets if b >= size)

    def _replay(self, token_ids, positions, slots, context_lens, block_tables) -> torch.Tensor:
        B = len(token_ids)
        b = self._bucket_of[B]
        s = self._static
        width = max(cdiv(c, self.config.block_size) for c in context_lens)
        tables = [t[:width] + [0] * (width - len(t[:width])) for t in block_tables]
        s["input_ids"][:B].copy_(self._tensor(token_ids, torch.int64))
        s["positions"][:B].copy_(self._tensor(positions, torch.int64))
        s["slots"].fill_(-1)
        s["slots"][:B].copy_(self._tensor(slots, torch.int64))
        s["context_lens"].zero_()
        s["context_lens"][:B].copy_(self._tensor(context_lens, torch.int32))
        s["block_tables"][:B, :width].copy_(self._tensor(tables, torch.int32))
        self.graphs[b].replay()
        return self._graph_out[b][:B]
