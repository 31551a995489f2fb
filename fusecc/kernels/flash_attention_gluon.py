"""Dense prefill attention for Hopper in Gluon: warp-specialized, ping-pong scheduled (FA3's plan).

Same contract as flash_attention_tma.py (no mask, fp16/bf16, head_dim 128 here, TMA-friendly
strides), a different schedule. In plain Triton every warpgroup runs QK^T -> wait -> softmax ->
PV -> wait in one stream, so the tensor cores idle during each softmax unless the other
warpgroup happens to be in a GEMM. Gluon lets us say what Triton cannot:

- a producer warpgroup (the default partition, shrunk to 24 registers a thread) issues every TMA
  load (Q once, then K/V tiles through a ring of STAGES shared-memory slots with ready/empty
  mbarriers), so the consumers never wait on addresses;
- two consumer warpgroups own 64 query rows each and take turns on the tensor cores: a consumer
  waits for its turn, issues its QK^T of tile j and its PV of tile j-1, hands the turn over, and
  runs its softmax while the other consumer's GEMMs execute (ping-pong);
- inside a consumer the softmax of tile j overlaps its own PV of tile j-1 (the accumulator is
  rescaled only after that GEMM retires), FA3's intra-warpgroup overlap.

Both consumers sweep the same key tiles, the CTA's range ([0, full_end) unmasked, then the
masked diagonal/tail), so their turn counts match and the K/V slots are freed by exactly two
arrivals. Rows that see no key come out 0, as in attention_tile.attn_normalize.

Gluon has no interpreter: this kernel runs on sm_90 only (the CPU tests compile it for sm_90;
flash_attention falls back to the descriptor or pointer kernels everywhere else).
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fusecc.kernels.attention_tile import attn_bounds
from fusecc.kernels.flash_attention_tma import tma_prefill_eligible

GLUON_HEAD_DIMS = (128,)
ROWS_PER_CONSUMER = 64   # one warpgroup's wgmma M
BLOCK_N = 128
# K/V slots in flight: 3 measured 8-16% faster than 2 at d=128 on an H200 (Q 32 KB + 3 x 64 KB of
# K/V = 224 KB of the 227 KB a block may have)
STAGES = 3


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
              b, h, kvh, start_m, n_blocks,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for c in gl.static_range(2):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, start_m + c * ROWS, 0], q_ready.index(c), q_smem.index(c))
    for j in range(n_blocks):
        s = j % STAGES
        # a fresh barrier counts as having completed the phase before 0: the first lap does not wait
        mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, kvh, j * BLOCK_N, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, kvh, j * BLOCK_N, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _masked_scores(qk, start_n, row0, seq_k, shift, qk_scale,
                   CAUSAL: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, qk_layout: gl.constexpr):
    # scaled logits, -inf past seq_k (TMA zero-fills those keys) and, causal, right of the diagonal
    cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, qk_layout))
    ok = gl.expand_dims(cols < seq_k, 0)
    if CAUSAL:
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, qk_layout)) + shift
        ok = ok & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1))
    return gl.where(ok, qk * qk_scale, float("-inf"))


@gluon.jit
def _softmax_tile(qk, m_i, l_i, qk_scale, MASKED: gl.constexpr):
    # attention_tile.softmax_step, in Gluon: (p, alpha, l, m) of one score tile
    if MASKED:
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk - gl.expand_dims(m_sub, 1))
    else:
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        m_sub = m_new
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_sub, 1))
    alpha = gl.exp2(m_i - m_sub)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, l_i, m_new


@gluon.jit
def _consumer_sweep(q, k_smem, v_smem, k_ready, v_ready, kv_empty, my_turn, their_turn,
                    acc, p_prev, m_i, l_i, lo, hi, turn_phase, row0, seq_k, shift, qk_scale,
                    CAUSAL: gl.constexpr, MASKED: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, qk_layout: gl.constexpr,
                    o_layout: gl.constexpr, p_layout: gl.constexpr):
    """Tiles [lo, hi) (lo >= 1: tile lo-1's probabilities p_prev still owe their PV)."""
    for j in range(lo, hi):
        s = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        mbarrier.wait(my_turn, turn_phase)
        turn_phase ^= 1
        qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                           gl.zeros([ROWS, BLOCK_N], gl.float32, qk_layout), use_acc=False, is_async=True)
        acc = warpgroup_mma(p_prev, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        mbarrier.arrive(their_turn, count=1)
        # the QK^T group retires first (groups complete in order); the PV may stay in flight
        qk = warpgroup_mma_wait(1, deps=[qk])
        if MASKED:
            qk = _masked_scores(qk, j * BLOCK_N, row0, seq_k, shift, qk_scale, CAUSAL, ROWS, BLOCK_N, qk_layout)
        p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, MASKED)
        # p_prev is the PV's A operand, read from registers: kept alive until the GEMM retires
        acc, p_prev = warpgroup_mma_wait(0, deps=[acc, p_prev])
        mbarrier.arrive(kv_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_prev = gl.convert_layout(p.to(q.dtype), p_layout)
    return acc, p_prev, m_i, l_i, turn_phase


@gluon.jit
def _consumer(o_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, turns,
              b, h, start_m, full_blocks, n_blocks, seq_k, shift, qk_scale,
              C: gl.constexpr, CAUSAL: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    qk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row0 = start_m + C * ROWS
    my_turn = turns.index(C)
    their_turn = turns.index(1 - C)
    q_tile = q_smem.index(C)
    q = q_tile.reshape([ROWS, HEAD_DIM])
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, qk_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, qk_layout))
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_ready.index(C), 0)
    if n_blocks > 0:
        # tile 0: consumer 0 goes first; consumer 1 waits for its first hand-over. From then on
        # consumer c's k-th wait on its turn barrier is for that barrier's phase k (parity k & 1)
        mbarrier.wait(k_ready.index(0), 0)
        turn_phase = 0
        if C == 1:
            mbarrier.wait(my_turn, 0)
            turn_phase = 1
        qk = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                           gl.zeros([ROWS, BLOCK_N], gl.float32, qk_layout), use_acc=False, is_async=True)
        mbarrier.arrive(their_turn, count=1)
        qk = warpgroup_mma_wait(0, deps=[qk])
        if full_blocks > 0:
            p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, False)
        else:
            qk = _masked_scores(qk, 0, row0, seq_k, shift, qk_scale, CAUSAL, ROWS, BLOCK_N, qk_layout)
            p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, True)
        p_prev = gl.convert_layout(p.to(q.dtype), p_layout)
        acc, p_prev, m_i, l_i, turn_phase = _consumer_sweep(
            q, k_smem, v_smem, k_ready, v_ready, kv_empty, my_turn, their_turn, acc, p_prev, m_i, l_i,
            1, full_blocks, turn_phase, row0, seq_k, shift, qk_scale,
            CAUSAL, False, ROWS, BLOCK_N, HEAD_DIM, STAGES, qk_layout, o_layout, p_layout)
        acc, p_prev, m_i, l_i, turn_phase = _consumer_sweep(
            q, k_smem, v_smem, k_ready, v_ready, kv_empty, my_turn, their_turn, acc, p_prev, m_i, l_i,
            gl.maximum(full_blocks, 1), n_blocks, turn_phase, row0, seq_k, shift, qk_scale,
            CAUSAL, True, ROWS, BLOCK_N, HEAD_DIM, STAGES, qk_layout, o_layout, p_layout)
        last = (n_blocks - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_prev, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc, p_prev = warpgroup_mma_wait(0, deps=[acc, p_prev])
    # rows that saw no key: l = 0, acc = 0 -> 0
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = acc / gl.expand_dims(gl.where(l_o == 0.0, 1.0, l_o), 1)
    # Q's slot is free once its last QK^T retired: the output tile goes out through it
    q.store(out.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, h, row0, 0], q_tile)
    tma.store_wait(0)


@gluon.jit
def _flash_attention_gluon_kernel(q_desc, k_desc, v_desc, o_desc, group, seq_q, seq_k, qk_scale,
                                  HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, ROWS: gl.constexpr,
                                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    # tile j's QK^T and tile j-1's PV need both their slots at once
    gl.static_assert(STAGES >= 2, "the K/V ring needs at least two slots")
    pid_m = gl.program_id(0)
    if CAUSAL:
        # the last query tiles see the most keys: start them first so the tail of the grid is short
        pid_m = gl.num_programs(0) - 1 - pid_m
    h = gl.program_id(1)
    b = gl.program_id(2)
    kvh = h // group
    start_m = pid_m * (2 * ROWS)
    # the CTA's key range, as every fusecc kernel splits it (unmasked, then masked), in tiles
    full_end, end = attn_bounds(start_m, seq_q, seq_k, 2 * ROWS, BLOCK_N, CAUSAL)
    shift = seq_k - seq_q
    full_blocks = full_end // BLOCK_N
    n_blocks = (end + BLOCK_N - 1) // BLOCK_N

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, ROWS, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(turns.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)

    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                     b, h, kvh, start_m, n_blocks, ROWS, BLOCK_N, STAGES)),
        (_consumer, (o_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, turns,
                     b, h, start_m, full_blocks, n_blocks, seq_k, shift, qk_scale,
                     0, CAUSAL, ROWS, BLOCK_N, HEAD_DIM, STAGES)),
        (_consumer, (o_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, turns,
                     b, h, start_m, full_blocks, n_blocks, seq_k, shift, qk_scale,
                     1, CAUSAL, ROWS, BLOCK_N, HEAD_DIM, STAGES)),
    ], [4, 4], [240, 240])


def device_is_hopper(device: torch.device) -> bool:
    """wgmma and setmaxnreg are sm_90 instructions (Blackwell has neither form). A seam for the
    CPU tests, which compile the kernel for sm_90 without a GPU."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def gluon_prefill_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           mask_kind: int) -> bool:
    """Whether this kernel computes the call: the descriptor kernel's case, head_dim 128, on sm_90."""
    return (q.shape[-1] in GLUON_HEAD_DIMS and device_is_hopper(q.device)
            and tma_prefill_eligible(q, k, v, out, mask_kind))


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


@functools.lru_cache(maxsize=None)
def _box_layout(rows: int, head_dim: int, dtype: torch.dtype):
    # computed once per box: it is most of a descriptor's host cost (~10 us uncached)
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], _gl_dtype(dtype))


def descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A rank-4 [batch, heads, seq, head_dim] descriptor whose box is `rows` rows of one (batch, head)."""
    d = t.shape[-1]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d], _box_layout(rows, d, t.dtype))


def launch_gluon_prefill(q, k, v, out, causal: bool, qk_scale: float, stages: int = STAGES) -> None:
    """out <- attention(q, k, v), where gluon_prefill_eligible holds."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    grid = ((Sq + 2 * ROWS_PER_CONSUMER - 1) // (2 * ROWS_PER_CONSUMER), Hq, B)
    _flash_attention_gluon_kernel[grid](
        descriptor(q, ROWS_PER_CONSUMER), descriptor(k, BLOCK_N), descriptor(v, BLOCK_N),
        descriptor(out, ROWS_PER_CONSUMER), Hq // Hkv, Sq, Sk, qk_scale,
        HEAD_DIM=D, CAUSAL=bool(causal), ROWS=ROWS_PER_CONSUMER, BLOCK_N=BLOCK_N, STAGES=stages, num_warps=4)
