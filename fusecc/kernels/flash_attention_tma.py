"""Dense prefill attention with TMA tensor descriptors (Hopper and newer).

The same tiled online softmax as flash_attention.py, for the common case only: no attention mask,
fp16/bf16, head_dim 64 or 128, every stride but the last a multiple of 16 bytes. Q, K, V and the
output are read and written through rank-4 descriptors over [batch, heads, seq, head_dim], so a
tile is one bulk copy into shared memory instead of a [rows, head_dim] tensor of 64-bit addresses
held in registers. Rows past seq_q or seq_k load as zeros and stores past seq_q are dropped by the
hardware, per (batch, head): a tile never reads the next head's rows.

Measured on one H200, bf16, 16k tokens, each kernel autotuned, same run (benchmarks/attention.py,
`fusecc_pointer_kernel_tflops` beside `fusecc_tflops`): d=128 -3% to +6% (4k causal 405 -> 431
TFLOP/s; 1k causal 303 -> 293), d=64 -1 to +4%. Against the pointer kernel's hand-picked d=128
config, which compiled graphs launch, +8-12% (scratch experiment: 4k non-causal 449 -> 487).
Anything outside the common case (a mask, fp32, odd head dims, unaligned strides or empty or
expanded dimensions, an older GPU) runs the pointer kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fusecc.kernels.attention_tile import attn_bounds, attn_normalize, softmax_step
from fusecc.kernels.launch import launch_tuned
from fusecc.triton_support import interpreting

TMA_HEAD_DIMS = (64, 128)


@triton.jit
def _attn_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, b, kvh, lo, hi, seq_k, q_pos, qk_scale,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """attention_tile.attn_inner over keys [lo, hi) of (batch b, kv head kvh), tiles from descriptors."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            offs_n = start_n + offs_n0
            ok = offs_n[None, :] < seq_k
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= q_pos[:, None])
            qk = tl.where(ok, qk * qk_scale, float("-inf"))
        p, alpha, l_i, m_i = softmax_step(qk, m_i, l_i, qk_scale, MASKED)
        v = v_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


def tma_prefill_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1, pre_hook=_set_block_shapes)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
            for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 4), (128, 64, 8, 3),
                                 (64, 128, 4, 3), (128, 64, 4, 4)]]


def _prune_tma_configs(configs, named_args, **kwargs):
    # measured on H200: d=128 wants 128x128 tiles with 8 warps, d=64 128x64 (or 64x128) with 4
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
    if len(configs) == 1:
        return configs
    if d == 128:
        keep = [c for c in configs if c.num_warps == 8]
    else:
        keep = [c for c in configs if c.num_warps == 4]
    return keep or configs


@functools.lru_cache(maxsize=None)
def first_tma_config(head_dim: int) -> triton.Config:
    """The config launched when not autotuning: the first one pruning keeps."""
    return _prune_tma_configs(tma_prefill_configs(), {"HEAD_DIM": head_dim})[0]


def _set_block_shapes(nargs) -> None:
    # a descriptor's box is part of what the kernel is launched with: it follows the tile config
    rows_q, rows_k, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["q_desc"].block_shape = [1, 1, rows_q, d]
    nargs["o_desc"].block_shape = [1, 1, rows_q, d]
    nargs["k_desc"].block_shape = [1, 1, rows_k, d]
    nargs["v_desc"].block_shape = [1, 1, rows_k, d]


@triton.autotune(configs=tma_prefill_configs(), key=["HEAD_DIM", "CAUSAL", "SEQ_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_tma_configs}, cache_results=True)
@triton.jit
def _flash_attention_tma_kernel(
    q_desc, k_desc, v_desc, o_desc, group, seq_q, seq_k, qk_scale,
    SEQ_BUCKET,  # autotune key only: power-of-two bucket of max(seq_q, seq_k)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # the last query tiles see the most keys: start them first so the tail of the grid is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // group
    start_m = pid_m * BLOCK_M
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    full_end, end = attn_bounds(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    q_pos = start_m + tl.arange(0, BLOCK_M) + (seq_k - seq_q)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attn_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, b, kvh, 0, full_end, seq_k, q_pos, qk_scale,
                                    BLOCK_N, HEAD_DIM, CAUSAL, False)
    acc, l_i, m_i = _attn_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, b, kvh, full_end, end, seq_k, q_pos,
                                    qk_scale, BLOCK_N, HEAD_DIM, CAUSAL, True)
    out = attn_normalize(acc, l_i)
    o_desc.store([b, h, start_m, 0], out.to(o_desc.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))


def device_has_tma(device: torch.device) -> bool:
    """TMA (cp.async.bulk.tensor) exists from Hopper (sm_90) on. A seam for tests, which run the
    descriptor kernel through the interpreter on CPU tensors."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _descriptor_ok(t: torch.Tensor) -> bool:
    # TMA needs a 16-byte-aligned base, a unit last stride and the other strides in 16-byte units
    # (an empty dimension, e.g. seq_k == 0, cannot be encoded; an expanded one, stride 0, is left
    # to the pointer kernel)
    item = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * item) % 16 == 0 for s in t.stride()[:-1])
            and all(0 < n < 2**31 for n in t.shape)
            and all(s > 0 for n, s in zip(t.shape, t.stride()) if n > 1))


def tma_prefill_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         mask_kind: int) -> bool:
    """Whether the descriptor kernel computes this call (else the pointer kernel does)."""
    return (mask_kind == 0 and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in TMA_HEAD_DIMS
            and device_has_tma(q.device) and all(_descriptor_ok(t) for t in (q, k, v, out)))


def launch_tma_prefill(q, k, v, out, causal: bool, qk_scale: float) -> None:
    """out <- attention(q, k, v) through _flash_attention_tma_kernel (tma_prefill_eligible holds)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]

    def desc(t):  # the box is set per config by _set_block_shapes
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, D])

    def grid(meta):
        return (triton.cdiv(Sq, meta["BLOCK_M"]), Hq, B)

    launch_tuned(_flash_attention_tma_kernel, grid, (
        desc(q), desc(k), desc(v), desc(out), Hq // Hkv, Sq, Sk, qk_scale, triton.next_power_of_2(max(Sq, Sk, 1)),
    ), dict(HEAD_DIM=D, CAUSAL=bool(causal)), first_tma_config(D))
