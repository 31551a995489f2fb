"""Runs one scheduled step on the device: flat inputs -> forward -> logits -> sampled tokens.

    runner = ModelRunner(model, config)                  # sizes and allocates the KV pool
    config = runner.config                                 # num_kv_blocks resolved
    sampled = runner.execute(scheduler_output, eos_ids)    # SamplerOutput (None if nothing samples
                                                           # and no prompt logprobs were asked for)

The forward is `torch.compile(model, backend="fusecc", options={"freeze": True, "autotune": ...},
dynamic=True)` unless `enforce_eager`: one graph for decode-only steps and one for mixed steps,
dynamic over the token count; the constructor compiles every graph a step can hit
(warmup(), fusecc/runtime/warmup.py) and a server tunes its attention kernels once at start-up
unless FUSECC_AUTOTUNE=0. On CUDA, decode-only steps of up to max_num_seqs sequences replay CUDA graphs
captured for batch-size buckets (1, 2, 4, 8, 16, 32, ...); a batch is padded to its bucket with
slot -1 (no cache write) and context length 0 (attention output 0) rows.

Per step, the host builds the flat inputs (fusecc/runtime/input_batch.py) and sends them through
pinned memory with asynchronous copies; the step's one synchronisation is the caller reading the
sampled tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import torch

from fusecc.cuda_graph import CapturedCall
from fusecc.kernels.launch import autotune_enabled
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.input_batch import BlockTableMirror, StepInputs, cdiv, cpu_tensor, prepare_inputs
from fusecc.runtime.models.attention import AttentionMetadata, kv_cache_torch_dtype
from fusecc.runtime.prompt_logprobs import PromptLogprobsPlanner, compute_prompt_logprobs
from fusecc.runtime.sampler import Sampler, SamplerOutput, SamplingMetadata
from fusecc.runtime.scheduler import SchedulerOutput
from fusecc.runtime.warmup import warmup_shapes

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BLOCKS = 512
# GPU memory kept out of the KV pool for what the profiling pass does not see: CUDA graphs,
# the sampler's temporaries (a few [max_num_seqs, vocab] fp32 copies), allocator slack.
GPU_RESERVE_BYTES = 512 << 20


def graph_buckets(max_num_seqs: int) -> list[int]:
    buckets, b = [], 1
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_seqs]


# Graphs one compiled forward may hold: warmup() compiles one per step shape Dynamo tells apart
# (8 on CUDA: decode-only/mixed x 1/several sequences x 1/several block-table columns; 2 on CPU).
# Past Dynamo's default limit (8) a new shape would silently run eagerly, and a decode CUDA graph
# captured then would record the eager model.
RECOMPILE_LIMIT = 64


def size_oblivious_compile(device: torch.device) -> bool:
    """Whether the forward compiles with fx's backed_size_oblivious: sizes 0 and 1 are not
    specialised, so one graph serves 1 and many tokens, sequences and block-table columns (2
    graphs instead of 8). On CPU each graph of a real model costs Dynamo and AOTAutograd a
    minute (SmolLM2-135M, 30 layers); CUDA keeps the specialising default until it has been
    measured there (its generated kernels and CUDA graphs are per bucket anyway)."""
    import torch.fx.experimental._config as fx_config

    return device.type == "cpu" and hasattr(fx_config, "backed_size_oblivious")


def compile_forward(model, size_oblivious: bool, **options):
    """`model` compiled with the fusecc backend (frozen weights, dynamic shapes; `options` are
    added to the backend's), called under the settings its compilation needs:
    - no duck sizing: equal sizes that are equal by coincidence (a batch of 8 sequences and 8 kv
      heads) do not become guards, each of which would cost a recompile when broken;
    - RECOMPILE_LIMIT instead of Dynamo's 8;
    - float attributes (RMSNorm's eps) are constants: dynamic=True otherwise turns each into a
      float64 0-d tensor input, which costs a second trace of the whole model (Dynamo restarts
      once it has traced the graph, to tensorify the scalar) and a dtype conversion plus a
      tensor add per norm at run time, instead of an add of a constant;
    - with `size_oblivious`, no 0/1 specialisation (see size_oblivious_compile)."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    from fusecc.compile_cache.precompiled_forward import PrecompiledForward

    shape_settings = {"use_duck_shape": False, **({"backed_size_oblivious": True} if size_oblivious else {})}
    options = {"freeze": True, "autotune": autotune_enabled(), **options}
    # each graph compiled ahead of time and stored, so a restart traces nothing (compile_cache/)
    fn = PrecompiledForward(model, options, torch.compile(model, backend="fusecc", dynamic=True, options=options),
                            max_graphs=RECOMPILE_LIMIT, while_compiling=static_cache_sizes)
    # made once: each config.patch() call defines a class, per step that would be run-time overhead
    with_settings = fx_config.patch(shape_settings)
    with_dynamo_settings = dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT, specialize_float=True)
    return with_settings(with_dynamo_settings(fn))


def kv_cache_tensors(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                     num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's K and V cache [num_blocks, block_size, kv_heads, head_dim], zeroed."""
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]


@contextlib.contextmanager
def static_cache_sizes(input_ids, positions, kv_caches, md):
    """While a forward compiles, its KV caches' sizes are constants to Dynamo. Under dynamic=True
    every cache would otherwise get four symbols of its own (240 for a 30-layer model), which
    AOTAutograd's functionalization of the cache write drags through every shape computation:
    SmolLM2's CPU compile took 2.5x as long. On CUDA the number of blocks stays dynamic: the
    KV-profiling forward runs on a scratch cache of another size than the pool, and a static size
    would compile the mixed-step graph twice. The markings are removed afterwards (see
    PrecompiledForward: a stored function's guards reject marked tensors)."""
    caches = [c for pair in kv_caches for c in pair]
    static_dims = [1, 2, 3] if caches and caches[0].is_cuda else [0, 1, 2, 3]
    for cache in caches:
        torch._dynamo.mark_static(cache, static_dims)
    try:
        yield
    finally:
        for cache in caches:
            for marking in ("_dynamo_static_indices", "_has_dynamo_dim_marking"):
                if hasattr(cache, marking):
                    delattr(cache, marking)


def kv_pool_too_small(config: EngineConfig, total: int, peak: int, non_torch: int, budget: float, per_block: int,
                      blocks_needed: int) -> str:
    """One line with the numbers behind a KV pool too small for one sequence (as vLLM says when other
    processes hold the memory that gpu_memory_utilization counts on); budget: what the sizing left
    for KV blocks."""
    def gib(n: float) -> str:
        return f"{n / 2**30:.2f} GiB"

    allowed = total * config.gpu_memory_utilization
    left = max(budget, 0)
    return (f"KV cache does not fit: gpu_memory_utilization={config.gpu_memory_utilization} allows {gib(allowed)} "
            f"of the GPU's {gib(total)}; weights and the largest step's activations take {gib(peak)}, memory "
            f"outside this process's PyTorch allocator (other processes, the CUDA context) {gib(non_torch)}, "
            f"leaving {gib(left)}: {int(left // per_block)} KV blocks of {per_block / 2**20:.2f} MiB where one "
            f"sequence of max_model_len={config.max_model_len} needs {blocks_needed}; raise "
            f"gpu_memory_utilization, free the GPU memory other processes hold, or lower max_model_len / "
            f"max_num_batched_tokens")


def dynamo_graph_breaks() -> dict[str, int]:
    """How often Dynamo has broken a graph in this process, by reason."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def bind_device(device: torch.device) -> None:
    """Make a CUDA device the calling thread's current one. Triton launches on the current device and
    the memory statistics and CUDA graphs use it: a model on cuda:1 with cuda:0 current would run its
    kernels on the wrong GPU. Each thread that steps the engine calls this (the current device is
    per thread)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


class ModelRunner:
    def __init__(self, model, config: EngineConfig) -> None:
        # the model's own device: config.device may be "auto"
        self.model, self.device = model, next(model.parameters()).device
        bind_device(self.device)
        enforce_eager = config.enforce_eager
        self.dtype = next(model.parameters()).dtype
        self.num_layers = len(model.model.layers)
        self.kv_heads, self.head_dim = model.kv_shape
        self.vocab_size = model.config.vocab_size
        self.max_blocks_per_seq = cdiv(config.max_model_len, config.block_size)
        # the paged pool's dtype: the model's, or float8_e4m3fn (kv_cache_dtype fp8: 1 byte an element)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype, self.device)
        self.size_oblivious = size_oblivious_compile(self.device)
        self.forward = model if enforce_eager else compile_forward(model, self.size_oblivious)
        if config.num_kv_blocks is None:
            num_blocks = self._profile_num_blocks(config) if self.device.type == "cuda" else max(
                CPU_DEFAULT_KV_BLOCKS, 2 * self.max_blocks_per_seq)
            config = dataclasses.replace(config, num_kv_blocks=num_blocks)
        self.config = config
        shape = (config.num_kv_blocks, config.block_size, self.kv_heads, self.head_dim)
        self.kv_caches = kv_cache_tensors(shape, self.kv_dtype, self.device, self.num_layers)
        self.sampler = Sampler(seed=config.seed)
        self.prompt_logprobs = PromptLogprobsPlanner()
        # Speculative decoding (fusecc/runtime/spec_decode/speculator.py) sets it: a step that
        # verifies drafts samples its rows with verify_drafts(logits, entries, eos) instead.
        self.verify_drafts = None
        self.verify_graphs = None  # and, on CUDA, the CUDA graphs of verification steps
        # Two rows per schedulable sequence: rows of finished sequences are recycled in bulk.
        self._tables = BlockTableMirror(2 * config.max_num_seqs, self.max_blocks_per_seq)
        self.num_graph_replays = 0
        self.graphs: dict[int, CapturedCall] = {}  # decode batch-size bucket -> its graph
        self._bucket_of: dict[int, int] = {}  # decode batch size -> captured bucket
        # CUDA graphs replay decode steps (and speculative verification, spec_decode/): only where the
        # compiled forward is whole graphs. Eager code between graphs (a graph break) may read a value
        # on the host (transformers' dynamic RoPE does), which a capture cannot hold, and whatever it
        # decided at capture would be frozen into every replay.
        counted = dynamo_graph_breaks()
        if not enforce_eager:
            self.warmup()
        graph_breaks = [reason for reason, n in dynamo_graph_breaks().items() if n > counted.get(reason, 0)]
        self.graph_breaks = graph_breaks  # reasons, of this runner's warm-up compilations
        self.cuda_graphs = self.device.type == "cuda" and not enforce_eager and not graph_breaks
        if self.device.type == "cuda" and graph_breaks:
            logger.warning("fusecc: the compiled forward has graph breaks (%s); decode steps run without CUDA "
                           "graphs", graph_breaks[0].splitlines()[0])
        if self.cuda_graphs:
            self._capture_graphs()

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, eos_token_ids=(), launched=None) -> SamplerOutput | None:
        """`launched`: with async scheduling, the step launched before this one, whose sampled
        tokens (on the device) are the input of this step's pending rows (async_scheduling.py)."""
        entries = out.scheduled
        assert entries, "execute() needs a non-empty schedule"
        inputs = prepare_inputs(entries, self._tables, self.config.block_size)
        feed = None if inputs.pending_rows is None else launched.feed(entries, inputs.pending_rows, self._device)
        if inputs.decode_only and inputs.num_seqs in self._bucket_of:
            hidden = self._replay(inputs, feed)
            self.num_graph_replays += 1
        elif inputs.num_spec_tokens and self.verify_graphs is not None and self.verify_graphs.fits(entries):
            hidden = self.verify_graphs.replay(entries, inputs)  # fusecc/runtime/spec_decode/verify_graphs.py
        else:
            md = AttentionMetadata(
                slot_mapping=self._device(inputs.slot_mapping, torch.int64),
                block_tables=self._device(inputs.block_tables, torch.int32),
                context_lens=self._device(inputs.context_lens, torch.int32),
                cu_seqlens_q=self._device(inputs.cu_seqlens_q, torch.int32),
                max_seqlen_q=inputs.max_seqlen_q, decode_only=inputs.decode_only, num_decodes=inputs.num_decodes)
            input_ids = self._device(inputs.token_ids, torch.int64)
            if feed is not None:
                input_ids.index_copy_(0, *feed)
            hidden = self.forward(input_ids, self._device(inputs.positions, torch.int64), self.kv_caches, md)
        # logits at every prompt position of the requests that ask for prompt logprobs (none usually)
        spans = self.prompt_logprobs.plan(entries, inputs.cu_seqlens_q, inputs.num_decodes)
        prompt_logprobs = compute_prompt_logprobs(spans, hidden, self.model.compute_logits, self.vocab_size,
                                                  self._device) if spans else None
        if not inputs.num_sampled:
            # prompt chunks that end before their prompts do: logprobs, no token
            return None if prompt_logprobs is None else SamplerOutput(
                token_ids=torch.empty(0, dtype=torch.int64, device=self.device), prompt_logprobs=prompt_logprobs)
        if inputs.sample_rows is not None:
            hidden = hidden[self._device(inputs.sample_rows, torch.int64)]
        logits = self.model.compute_logits(hidden)
        if inputs.num_spec_tokens:
            out = self.verify_drafts(logits, entries, eos_token_ids)
            out.prompt_logprobs = prompt_logprobs
            return out
        md = SamplingMetadata.build([e.seq for e in entries if e.do_sample], vocab_size=self.vocab_size,
                                    device=self.device, eos_token_ids=eos_token_ids)
        out = self.sampler(logits, md)
        out.prompt_logprobs = prompt_logprobs
        return out

    def _device(self, values, dtype: torch.dtype) -> torch.Tensor:
        """A list (or CPU tensor) on the device. CUDA: through pinned memory, so the copy is
        asynchronous (a pageable source makes cudaMemcpyAsync wait for the stream); the caching
        host allocator keeps the pinned block until the copy has run."""
        t = values if isinstance(values, torch.Tensor) else cpu_tensor(values, dtype)
        assert t.dtype == dtype, (t.dtype, dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    # --- start-up ---------------------------------------------------------------------------
    @torch.inference_mode()  # as execute(): a compiled graph guards on its inputs' dispatch keys
    def warmup(self) -> None:
        """Compile (and on CUDA autotune) every graph a step can hit (fusecc/runtime/warmup.py),
        so that no request pays for it."""
        start = time.perf_counter()
        shapes = self.warm_up_steps(self.forward, self.kv_caches)
        self._warm_up_sampler()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        logger.info("warm-up: %d step shapes compiled in %.1f s", len(shapes), time.perf_counter() - start)

    @torch.inference_mode()
    def warm_up_steps(self, forward, kv_caches) -> list:
        """One dummy step of each shape through `forward` (this runner's, or a speculative draft's
        over its own caches: spec_decode/draft_loader.py); returns the shapes."""
        shapes = warmup_shapes(self.config, self.max_blocks_per_seq, self.size_oblivious)
        for q, ctx in shapes:
            width = cdiv(max(ctx), self.config.block_size)
            tokens = sum(q)
            positions = [p for n, c in zip(q, ctx) for p in range(c - n, c)]
            cu = [0]
            for n in q:
                cu.append(cu[-1] + n)
            md = AttentionMetadata(
                slot_mapping=self._device([-1] * tokens, torch.int64),  # -1: no KV written
                block_tables=self._device(torch.zeros((len(q), width), dtype=torch.int32), torch.int32),
                context_lens=self._device(ctx, torch.int32), cu_seqlens_q=self._device(cu, torch.int32),
                max_seqlen_q=max(q), decode_only=tokens == len(q), num_decodes=sum(n == 1 for n in q))
            forward(self._device([0] * tokens, torch.int64), self._device(positions, torch.int64), kv_caches, md)
        return shapes

    def _warm_up_sampler(self) -> None:
        """Run each sampling path once (plain greedy; seeded and unseeded top-k/top-p sampling with
        penalties and logprobs) on dummy logits, so that the first request does not load their
        kernels. A throwaway Sampler: the engine's own draws nothing and keeps its seed stream."""
        from types import SimpleNamespace

        from fusecc.runtime.sampling_params import SamplingParams

        kinds = [SamplingParams(temperature=0.0),
                 SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=0, logprobs=2,
                                repetition_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.1),
                 SamplingParams(temperature=1.0, top_p=0.95)]
        seqs = [SimpleNamespace(sampling_params=p, prompt_token_ids=[0, 1], output_token_ids=[1]) for p in kinds]
        logits = torch.zeros(len(kinds), self.vocab_size, dtype=torch.float32, device=self.device)  # compute_logits'
        sampler = Sampler(seed=0, logprobs_mode=self.sampler.logprobs_mode)
        for rows in (seqs[:1], seqs):
            sampler(logits[:len(rows)], SamplingMetadata.build(rows, vocab_size=self.vocab_size, device=self.device))

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
        scratch = kv_cache_tensors(shape, self.kv_dtype, self.device, self.num_layers)
        scratch_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in scratch)
        tables, first, positions, cu = [], 0, [], [0]
        for n, nb in zip(lens, blocks):
            tables.append(list(range(first, first + nb)) + [0] * (max(blocks) - nb))
            first += nb
            positions += range(n)
            cu.append(cu[-1] + n)
        # The inputs are made under inference_mode, like execute()'s: a compiled graph guards on
        # the dispatch keys of its tensor inputs, so normal tensors here would cost a recompile
        # of the mixed-step graph at the first real step. (The caches are normal tensors in both.)
        with torch.inference_mode():
            md = AttentionMetadata(
                slot_mapping=self._tensor(list(range(num_tokens)), torch.int64),
                block_tables=self._tensor(tables, torch.int32), context_lens=self._tensor(lens, torch.int32),
                cu_seqlens_q=self._tensor(cu, torch.int32), max_seqlen_q=max(lens), decode_only=False)
            hidden = self.forward(torch.zeros(num_tokens, dtype=torch.int64, device=self.device),
                                  self._tensor(positions, torch.int64), scratch, md)
            self.model.compute_logits(hidden[:config.max_num_seqs]).softmax(-1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - scratch_bytes
        del scratch, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        # a speculative draft's weights and KV pool (as many blocks as this one) come after this
        from fusecc.runtime.spec_decode.draft_memory import draft_memory

        draft_weights, draft_block_bytes = draft_memory(config.speculative_config, self.model, self.dtype)
        budget = total * config.gpu_memory_utilization - peak - non_torch - GPU_RESERVE_BYTES - draft_weights
        per_block = self.num_layers * 2 * bs * self.kv_heads * self.head_dim * self.kv_dtype.itemsize
        per_block += bs * draft_block_bytes
        num_blocks = int(budget // per_block)
        if num_blocks < self.max_blocks_per_seq:
            raise RuntimeError(kv_pool_too_small(config, total, peak + draft_weights, non_torch, budget, per_block,
                                                 self.max_blocks_per_seq))
        return num_blocks

    # --- CUDA graphs for decode ---------------------------------------------------------------
    def _capture_graphs(self) -> None:
        start = time.perf_counter()
        buckets = graph_buckets(self.config.max_num_seqs)
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            # inference tensors, as execute()'s and warmup()'s inputs: a compiled graph guards on
            # its inputs' dispatch keys, so normal tensors here would compile other graphs
            self._static = self._static_inputs()
            for b in reversed(buckets):  # largest first: the smaller graphs reuse its memory pool
                args = self._graph_args(b)
                for _ in range(2):  # compile / autotune outside the capture
                    self.forward(*args)
                self.graphs[b] = CapturedCall(self.forward, args, pool)
                # the first replay of a graph uploads it (milliseconds): here, not in the first
                # request; the static inputs are the dummy ones (slot -1: no KV written)
                self.graphs[b].replay()
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs in %.1f s", len(buckets), time.perf_counter() - start)
        for size in range(1, self.config.max_num_seqs + 1):
            self._bucket_of[size] = next(b for b in buckets if b >= size)

    def _static_inputs(self) -> dict[str, torch.Tensor]:
        """The decode graphs' input buffers, for max_num_seqs rows; bucket b reads the first b."""
        n, dev = self.config.max_num_seqs, self.device
        return dict(
            input_ids=torch.zeros(n, dtype=torch.int64, device=dev),
            positions=torch.zeros(n, dtype=torch.int64, device=dev),
            slots=torch.full((n,), -1, dtype=torch.int64, device=dev),
            context_lens=torch.zeros(n, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((n, self.max_blocks_per_seq), dtype=torch.int32, device=dev),
            cu=torch.arange(n + 1, dtype=torch.int32, device=dev),
        )

    def _graph_args(self, b: int) -> tuple:
        """forward() arguments of the bucket-b decode graph: views of the static inputs."""
        s = self._static
        md = AttentionMetadata(slot_mapping=s["slots"][:b], block_tables=s["block_tables"][:b],
                               context_lens=s["context_lens"][:b], cu_seqlens_q=s["cu"][:b + 1],
                               max_seqlen_q=1, decode_only=True, num_decodes=b)
        return (s["input_ids"][:b], s["positions"][:b], self.kv_caches, md)

    def _replay(self, inputs: StepInputs, feed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Copy a decode batch into the static inputs of its bucket's graph (one host-to-device
        copy for the 1-D inputs, one for the block tables) and replay it. Rows past the batch
        get slot -1 (no cache write) and context length 0 (attention output 0). `feed`: (rows,
        token ids) already on the device, written over those rows' input ids (async scheduling)."""
        B = inputs.num_seqs
        b = self._bucket_of[B]
        s = self._static
        pad = [0] * (b - B)
        # [4 * b] int64: token ids | positions | slots | context lengths, each padded to b
        packed = self._device(inputs.token_ids + pad + inputs.positions + pad + inputs.slot_mapping
                              + [-1] * (b - B) + inputs.context_lens + pad, torch.int64)
        tables = self._device(inputs.block_tables, torch.int32)
        s["input_ids"][:b].copy_(packed[:b])
        if feed is not None:
            s["input_ids"].index_copy_(0, *feed)
        s["positions"][:b].copy_(packed[b:2 * b])
        s["slots"][:b].copy_(packed[2 * b:3 * b])
        s["context_lens"][:b].copy_(packed[3 * b:])  # int64 -> int32
        s["block_tables"][:B, :tables.shape[1]].copy_(tables)
        return self.graphs[b].replay()[:B]
