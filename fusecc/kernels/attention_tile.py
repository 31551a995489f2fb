"""The inner loop shared by every fusecc attention kernel.

One query tile `q [BLOCK_M, HEAD_DIM_PAD]` sweeps key/value tiles `[BLOCK_N, HEAD_DIM_PAD]` with an
online softmax (base-2: `qk_scale` already holds `scale * log2(e)`, so `exp2` replaces `exp`).
Running state per row, all fp32: `m` (max logit seen), `l` (sum of exp2(logit - m)), `acc`
(sum of p·v). The callers differ only in where the tiles come from, chosen by constexprs:

- dense K/V (`PAGED=False`): key `n` lives at `k_ptr + n * stride_kn`;
- paged K/V (`PAGED=True`): key `n` lives in page `block_table[n // PAGE_SIZE]`, slot `n % PAGE_SIZE`.

A range of keys is swept either unmasked (`MASKED=False`: every key < seq_k and visible to every
row — no compares, no selects, the fast path) or masked (`MASKED=True`: the causal diagonal and
the ragged tail of seq_k). `attn_bounds` splits a query tile's keys into those two ranges.

An explicit attention mask (dense kernel only) is a third constexpr, `MASK_KIND`:
0 none; 1 boolean (keep where True, read as uint8); 2 additive float bias (any float dtype, added
to the scaled logit in fp32). The mask tile `[BLOCK_M, BLOCK_N]` is read through strides, so a
broadcast mask (stride 0 on batch/head, an `expand`ed HF mask) is never materialised. With a
mask every tile takes the compare-and-select path, the masked sweep's arithmetic.

K/V tiles may come from an fp8 cache (float8_e4m3fn): each tile is converted to q's dtype in
registers (exact: every e4m3 value is a bf16/fp16 value) right after its load, so the dots run as
they do on a float cache; the caller folds the cache's k_scale into `qk_scale` and multiplies the
normalized output by its v_scale.

Rows that see no key keep m = -inf, l = 0, acc = 0; `attn_normalize` maps them to 0, not NaN.
That covers rows a mask hides completely (all False, or all -inf): SDPA (torch >= 2.5, every
backend we checked) returns 0 there too. A row hidden by a *finite* minimum (HF eager's
`finfo.min`) is not empty: every logit rounds to that minimum and the row averages v uniformly,
in eager and here alike (biases below -2.3e38 are clamped there, so the base-2 bias cannot
overflow to -inf).
"""

import functools

import torch
import triton
import triton.language as tl

from fusecc.kernels.exact_dot import exact_dot
from fusecc.triton_support import interpreting


@triton.jit
def _load_rows(ptrs, rows_ok, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               HEAD_DIM_PAD: tl.constexpr):
    # ptrs: [R, HEAD_DIM_PAD]; the head-dim mask exists only for padded (non power of two) dims.
    if MASK_ROWS:
        if HEAD_DIM == HEAD_DIM_PAD:
            t = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == HEAD_DIM_PAD:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return t


@triton.jit
def attn_bounds(start_m, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr):
    """Key ranges of the query rows [start_m, start_m + BLOCK_M): [0, full_end) unmasked,
    [full_end, end) masked. Causal is aligned bottom-right: query i sees keys <= i + seq_k - seq_q."""
    full_k = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        shift = seq_k - seq_q
        # keys every row of the tile sees: <= start_m + shift; clamp before dividing (no negative //)
        first_row_sees = tl.maximum(start_m + shift + 1, 0)
        full_end = tl.minimum((first_row_sees // BLOCK_N) * BLOCK_N, full_k)
        end = tl.maximum(tl.minimum(start_m + BLOCK_M + shift, seq_k), 0)
    else:
        full_end = full_k
        end = seq_k
    # a tile past the last query row (varlen grids are sized for the longest sequence) does no work
    end = tl.where(start_m < seq_q, end, 0)
    full_end = tl.minimum(full_end, end)
    return full_end, end


@triton.jit
def attn_inner(acc, l_i, m_i, q,
               k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
               table_ptr, stride_kpage, stride_vpage,
               lo, hi, seq_k, q_pos, qk_scale,
               mask_ptr, stride_mq, stride_mk, offs_m, seq_q, window, softcap_log2,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK_KIND: tl.constexpr,
               WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """Sweep keys [lo, hi) in BLOCK_N steps; returns the updated (acc, l_i, m_i).

    q: [BLOCK_M, HEAD_DIM_PAD] (input dtype); acc: [BLOCK_M, HEAD_DIM_PAD] fp32; l_i, m_i: [BLOCK_M] fp32.
    q_pos: [BLOCK_M] the last key each row may see (used when CAUSAL and MASKED).
    k_ptr/v_ptr point at key 0 of this (sequence, kv head); for PAGED, at page 0 slot 0 of this kv
    head, and table_ptr at this sequence's block-table row.
    MASK_KIND != 0: mask_ptr points at element [0, 0] of this (batch, head)'s [seq_q, seq_k] mask;
    offs_m: [BLOCK_M] the query rows (those >= seq_q are padding and read nothing).
    WINDOW (with MASKED): row i also hides keys <= q_pos[i] - window (sliding-window attention).
    SOFTCAP: logits become cap * tanh(logit / cap) after scaling; softcap_log2 = cap * log2(e).
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seq_k
        if PAGED:
            if MASKED:
                page = tl.load(table_ptr + offs_n // PAGE_SIZE, mask=n_ok, other=0)
            else:
                page = tl.load(table_ptr + offs_n // PAGE_SIZE)
            page = page.to(tl.int64)
            slot = (offs_n % PAGE_SIZE).to(tl.int64)
            k_rows = page * stride_kpage + slot * stride_kn
            v_rows = page * stride_vpage + slot * stride_vn
        else:
            k_rows = offs_n.to(tl.int64) * stride_kn
            v_rows = offs_n.to(tl.int64) * stride_vn
        k = _load_rows(k_ptr + k_rows[:, None] + offs_d[None, :] * stride_kd, n_ok, offs_d,
                       MASKED, HEAD_DIM, HEAD_DIM_PAD).to(q.dtype)  # fp8 cache: dequantized here
        qk = exact_dot(q, tl.trans(k), None)  # [BLOCK_M, BLOCK_N] fp32
        if SOFTCAP:
            # in base-2 units: cap2 * tanh(qk * scale / cap), cap2 = cap * log2(e)
            qk = softcap_log2 * _tanh(qk * (qk_scale / softcap_log2))
        elif MASKED or MASK_KIND != 0:
            qk = qk * qk_scale
        if MASKED or MASK_KIND != 0:
            ok = n_ok[None, :]
            if CAUSAL and MASKED:
                ok = ok & (offs_n[None, :] <= q_pos[:, None])
            if WINDOW and MASKED:
                ok = ok & (offs_n[None, :] > q_pos[:, None] - window)
            if MASK_KIND != 0:
                tile_ok = (offs_m[:, None] < seq_q) & n_ok[None, :]
                m_ptrs = (mask_ptr + offs_m.to(tl.int64)[:, None] * stride_mq
                          + offs_n.to(tl.int64)[None, :] * stride_mk)
                if MASK_KIND == 1:
                    ok = ok & (tl.load(m_ptrs, mask=tile_ok, other=0) != 0)
                else:
                    bias = tl.load(m_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
                    # to base-2 units like qk. A finite bias near -FLT_MAX (HF's finfo.min) must stay
                    # finite: clamped to -FLT_MAX / log2(e) first, so the product cannot overflow;
                    # only a true -inf hides the key
                    bias2 = tl.maximum(bias, -2.3e38) * 1.4426950408889634
                    qk = qk + tl.where(bias == float("-inf"), float("-inf"), bias2)
            qk = tl.where(ok, qk, float("-inf"))
        p, alpha, l_i, m_i = softmax_step(qk, m_i, l_i, qk_scale, MASKED or MASK_KIND != 0 or SOFTCAP)
        v = _load_rows(v_ptr + v_rows[:, None] + offs_d[None, :] * stride_vd, n_ok, offs_d,
                       MASKED, HEAD_DIM, HEAD_DIM_PAD).to(q.dtype)
        acc = acc * alpha[:, None]
        acc = exact_dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _tanh(x):
    # no libdevice in the interpreter; exp2 overflowing to inf gives the right limits (+-1)
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2.885... = 2 * log2(e)


@triton.jit
def softmax_step(qk, m_i, l_i, qk_scale, SCALED_AND_MASKED: tl.constexpr):
    """One online-softmax step over a score tile `qk [R, N]` fp32. Returns (p, alpha, l_i, m_new):
    the tile's weights, the factor that rescales the running accumulator, and the updated row sum
    and max; the caller does `acc = dot(p, v, acc * alpha)`.

    SCALED_AND_MASKED: qk is already scaled and -inf where hidden, so a row may have seen nothing
    yet. Otherwise qk is raw and every entry visible: the scale goes on the row max, not the tile
    (qk_scale >= 0, checked by the wrappers), then one FMA per entry."""
    if SCALED_AND_MASKED:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row that has seen nothing yet keeps m = -inf; subtract 0 instead (exp2(-inf) = 0, no NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        qk = qk - m_sub[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_new
        qk = qk * qk_scale - m_sub[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def attn_rows(q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
              table_ptr, stride_kpage, stride_vpage,
              start_m, seq_q, seq_k, qk_scale,
              mask_ptr, stride_mq, stride_mk, window, softcap_log2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
              PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK_KIND: tl.constexpr,
              WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """Attention of query rows [start_m, start_m + BLOCK_M) of one (sequence, head): the unmasked
    sweep, then the masked one. Returns the normalized output tile [BLOCK_M, HEAD_DIM_PAD] fp32.
    mask_ptr (MASK_KIND != 0): this (sequence, head)'s [seq_q, seq_k] mask, element [0, 0].
    WINDOW (causal only): row i sees keys (q_pos[i] - window, q_pos[i]]; the sweep starts at the
    first row's first key and is masked throughout (the window's lower edge moves with the row)."""
    full_end, end = attn_bounds(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_pos = offs_m + (seq_k - seq_q)
    lo = 0
    if WINDOW:
        lo = (tl.maximum(start_m + (seq_k - seq_q) - window + 1, 0) // BLOCK_N) * BLOCK_N
        lo = tl.minimum(lo, end)
        full_end = lo
    acc, l_i, m_i = attn_span(q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                              table_ptr, stride_kpage, stride_vpage, lo, full_end, end, seq_k, q_pos, qk_scale,
                              mask_ptr, stride_mq, stride_mk, offs_m, seq_q, window, softcap_log2,
                              BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL, PAGED, PAGE_SIZE, MASK_KIND,
                              WINDOW, SOFTCAP)
    return attn_normalize(acc, l_i)


@triton.jit
def attn_span(q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
              table_ptr, stride_kpage, stride_vpage,
              lo, full_end, end, seq_k, q_pos, qk_scale,
              mask_ptr, stride_mq, stride_mk, offs_m, seq_q, window, softcap_log2,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              CAUSAL: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK_KIND: tl.constexpr,
              WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """A fresh online softmax of the ROWS query rows of `q` over keys [lo, full_end) unmasked, then
    [full_end, end) masked (attn_inner's arguments otherwise). Returns (acc, l_i, m_i), not yet
    normalized: split-KV decode needs l_i and m_i for its log-sum-exp."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)
    acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                               table_ptr, stride_kpage, stride_vpage, lo, full_end, seq_k, q_pos, qk_scale,
                               mask_ptr, stride_mq, stride_mk, offs_m, seq_q, window, softcap_log2,
                               BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL, False, PAGED, PAGE_SIZE, MASK_KIND,
                               WINDOW, SOFTCAP)
    acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                               table_ptr, stride_kpage, stride_vpage, full_end, end, seq_k, q_pos, qk_scale,
                               mask_ptr, stride_mq, stride_mk, offs_m, seq_q, window, softcap_log2,
                               BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL, True, PAGED, PAGE_SIZE, MASK_KIND,
                               WINDOW, SOFTCAP)
    return acc, l_i, m_i


@triton.jit
def attn_normalize(acc, l_i):
    # rows that saw no key have l = 0 and acc = 0: divide by 1 so they come out 0, not NaN
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


# ---- host-side helpers shared by the attention wrappers ----

LOG2E = 1.4426950408889634

def head_dim_pad(head_dim: int) -> int:
    """Head dims that are not powers of two (80, 96) run padded to the next one, masked; >= 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def check_head_dim(head_dim: int) -> None:
    if head_dim > 256:
        raise ValueError(f"fusecc attention supports head_dim <= 256, got {head_dim}")


def softmax_scale(scale, head_dim: int) -> float:
    """The logit scale (default 1/sqrt(head_dim)); the unmasked sweep needs it non-negative."""
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if scale < 0:
        raise ValueError(f"fusecc attention needs a non-negative scale, got {scale}")
    return scale


# Autotune keys of the runtime's paged kernels: a few size classes, not every power of two. Each
# new key value costs an autotuning run (every config compiled and timed: 0.3-2 s on an H100), and
# a serving engine would meet a new power of two with each new prompt length (H100, tiny Llama: a
# 700-token prompt stalled 340 ms, a prefix-cache hit leaving 8 new tokens 1.8 s); the engine's
# warm-up tunes each class at start-up (runtime/warmup.py), so no request pays for one.
TUNING_CLASSES = (16, 128, 1024, 8192)


def tuning_class(n: int) -> int:
    """The autotune class of a size (tokens of the longest query, keys, programs)."""
    for c in TUNING_CLASSES:
        if n <= c:
            return c
    return TUNING_CLASSES[-1]


def window_and_softcap(sliding_window, softcap) -> tuple[int, float]:
    """(window, softcap_log2) as the kernels take them: 0 for no window / no cap. Checked here so a
    bad value is an error naming it, not a silent full attention."""
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"fusecc attention: sliding_window must be a positive integer or None, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fusecc attention: softcap must be positive or None, got {softcap!r}")
    return int(sliding_window or 0), float(softcap) * LOG2E if softcap else 0.0


def check_kv_cache_dtype(name: str, dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         k_scale: float, v_scale: float) -> bool:
    """Whether the caches are fp8 (float8_e4m3fn, then with positive finite scales) rather than in
    `dtype` (the model's: q's, or the new k/v's); anything else is a ValueError naming `name`."""
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (dtype, torch.float8_e4m3fn):
        raise ValueError(f"{name}: k_cache/v_cache must both be {dtype} or float8_e4m3fn, got "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and not all(0.0 < s < float("inf") for s in (k_scale, v_scale)):
        raise ValueError(f"{name}: an fp8 cache needs positive finite k_scale/v_scale, got {k_scale}, {v_scale}")
    return fp8


def kv_scales(name: str, q, k_cache, v_cache, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The (k_scale, v_scale) a paged kernel applies: the given ones for fp8 caches, (1.0, 1.0) for
    caches in q's dtype; other cache dtypes are a ValueError naming `name`."""
    if check_kv_cache_dtype(name, q.dtype, k_cache, v_cache, k_scale, v_scale):
        return float(k_scale), float(v_scale)
    return 1.0, 1.0


def prefill_configs():
    """Tile configs of the prefill kernels (dense and varlen share the inner loop, so the tiles too)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    cfgs = []
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                         (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 4)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def prune_prefill_configs(configs, named_args, **kwargs):
    # register/shared-memory budget on Hopper: big tiles only for small head dims
    d = named_args.get("HEAD_DIM_PAD", kwargs.get("HEAD_DIM_PAD"))
    if d is None or len(configs) == 1:
        return configs
    if d <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == 128 and c.num_stages == 3]
    elif d <= 128:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == 128 or c.num_stages == 3 and c.kwargs["BLOCK_N"] == 64]
    else:
        keep = [c for c in configs if c.num_stages == 2 and c.kwargs["BLOCK_N"] <= 64]
    return keep or configs


@functools.lru_cache(maxsize=None)
def first_prefill_config(head_dim_pad: int) -> triton.Config:
    """The config the prefill kernels launch when not autotuning: the first one pruning keeps."""
    return prune_prefill_configs(prefill_configs(), {"HEAD_DIM_PAD": head_dim_pad})[0]
