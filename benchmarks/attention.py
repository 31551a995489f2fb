"""Attention kernels on the GPU: fusecc vs SDPA (flash, cuDNN) for prefill, vs copy bandwidth for decode.

    PYTHONPATH=. python benchmarks/attention.py --out benchmarks/results/attention.json

Prefill: bf16, MHA, batch·seq = 16k tokens, d=64 (32 heads) and d=128 (16 heads), seq 1k/4k/16k,
causal and not; TFLOP/s = 4·B·H·Sq·Sk·D (halved when causal) / median time. Where the Gluon kernel
runs (d=128 on sm_90) the TMA descriptor kernel is timed beside it (`fusecc_tma_kernel_tflops`), and
the pointer kernel beside both (`fusecc_pointer_kernel_tflops`).
Decode: paged, bf16, GQA 32/8, d=128, block_size 16, batch 1/8/64 × context 1k/8k/32k;
bandwidth = bytes of K and V read / time per call, against a measured device-to-device copy (bytes
read + written / time) of 512 MiB, and against a one-kernel read of the same bytes timed the same way
(`same_size_read_tbs`: what a call of that size can reach once launch and ramp are paid); up to
32 MB, also against a kernel that reads the same K/V through the block table and does nothing else
(`paged_gather_tbs`: what the paged layout allows a call of that size).
Decode is timed as the runtime runs it: calls replayed back to back from one CUDA graph, each call
on its own K/V cache (rotating over enough caches that no call finds its K/V in the 50 MB L2),
time per call = CUDA-event time of the replays / calls. do_bench's L2 flush is not used
for decode: it memsets 256 MB right before the call, and writing back those dirty L2 lines (~17 us)
lands inside a 10-30 us kernel's time; its single-call figure is kept beside, as `flushed_single_call_us`.
The eager time (Python launch cost included) is kept too. Prefill times are do_bench medians.
"""

import argparse
import contextlib
import datetime
import json
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from fusecc.kernels import flash_attention, paged_attention
from fusecc.kernels import flash_attention_gluon, flash_attention_tma
from fusecc.kernels.flash_attention import _flash_attention_kernel
from fusecc.kernels.flash_attention_gluon import gluon_prefill_eligible
from fusecc.kernels.flash_attention_tma import _flash_attention_tma_kernel, tma_prefill_eligible
from fusecc.kernels.paged_attention import _paged_decode_kernel
from fusecc.kernels.split_kv import choose_num_splits
from fusecc.kernels.launch import num_sms


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def time_in_graph(fn, calls: int, min_ms: float = 20.0) -> float:
    """Milliseconds per call of `fn(i)`, i in range(calls), captured back to back in one CUDA graph
    and replayed until at least min_ms of GPU time was measured (CUDA events, no L2 flush)."""
    for i in range(calls):  # warm-up: compile / autotune outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    replays = max(5, int(min_ms / max(start.elapsed_time(end), 1e-3)))
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def copy_bandwidth():
    """Device-to-device copy of 512 MiB (far beyond L2), bytes read + written / time, the best of
    three ways of running it: a CUDA graph captures `copy_` as a memcpy node, which the copy engines
    run (measured ~20% slower than a kernel), so eager back-to-back copies and an elementwise copy
    kernel are timed too. The highest is the reference: the conservative choice for a fraction of it."""
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    ms = [time_in_graph(lambda i: dst.copy_(src), calls=4), _eager_ms(lambda: dst.copy_(src)),
          _eager_ms(lambda: torch.mul(src, 1, out=dst))]
    return nbytes / (min(ms) * 1e-3) / 1e12  # TB/s


@contextlib.contextmanager
def _device_says_no(module, seam: str):
    saved = getattr(module, seam)
    setattr(module, seam, lambda device: False)
    try:
        yield
    finally:
        setattr(module, seam, saved)


def pointer_kernel_only():
    """flash_attention without the TMA descriptor and Gluon kernels (device_has_tma says no)."""
    return _device_says_no(flash_attention_tma, "device_has_tma")


def without_gluon():
    """flash_attention without the Gluon kernel: the descriptor kernel takes its calls."""
    return _device_says_no(flash_attention_gluon, "device_is_hopper")


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # one wide load per program, summed so it is not dead code: a plain streaming read
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(x.to(tl.float32), 0))


def read_bandwidth(nbytes: int, copies: int) -> float:
    """TB/s of a one-kernel read of `nbytes`, timed like decode: back to back in one CUDA graph over
    `copies` buffers; the best of torch.sum and a streaming Triton read (one 8/16 KB load per
    program: measured ~60% faster than torch.sum at 32 MB on an H200). At tens of MB a call's fixed
    cost (launch, ramp, tail) is a visible share: this is the same-size reference beside the copy."""
    bufs = [torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    n = bufs[0].numel()
    partial = torch.empty(triton.cdiv(n, 4096), device="cuda", dtype=torch.float32)
    ms = [time_in_graph(lambda i: bufs[i].sum(dtype=torch.float32), calls=copies)]
    for block in (4096, 8192):
        ms.append(time_in_graph(lambda i: _stream_read_kernel[(triton.cdiv(n, block),)](bufs[i], partial, n, BLOCK=block),
                                calls=copies))
    return nbytes / (min(ms) * 1e-3) / 1e12


@triton.jit
def _paged_gather_kernel(k_ptr, v_ptr, table_ptr, out_ptr, keys_per_split, stride_page, stride_slot, stride_head,
                         stride_table, BLOCK_N: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr):
    # decode's reads and nothing else: the K and V rows of one (split, kv head, sequence), found
    # through the block table, summed
    split = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    lo = split * keys_per_split
    for start in range(lo, lo + keys_per_split, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        page = tl.load(table_ptr + b * stride_table + offs_n // PAGE).to(tl.int64)
        rows = page * stride_page + (offs_n % PAGE) * stride_slot + kvh * stride_head
        acc += tl.load(k_ptr + rows[:, None] + offs_d[None, :]).to(tl.float32)
        acc += tl.load(v_ptr + rows[:, None] + offs_d[None, :]).to(tl.float32)
    tl.store(out_ptr + (b * tl.num_programs(1) + kvh) * tl.num_programs(0) + split, tl.sum(tl.sum(acc, 1), 0))


def paged_gather_bandwidth(caches, tables, ctx_len: int) -> float:
    """TB/s of reading decode's K/V bytes through the block table with no attention math (best of a
    few tilings, one program per split of a (sequence, kv head), loads straight to registers), timed
    like decode: what the paged layout itself allows a call of this size."""
    k0 = caches[0][0]
    B, (_, page, Hkv, D) = tables.shape[0], k0.shape
    partial = torch.empty(4096 * B * Hkv, device="cuda", dtype=torch.float32)
    best = float("inf")
    for splits in (32, 64, 128, 256):
        for block_n in (32, 64):
            keys = ctx_len // splits
            if splits * B * Hkv > partial.numel() or keys % block_n:
                continue
            best = min(best, time_in_graph(lambda i: _paged_gather_kernel[(splits, Hkv, B)](
                caches[i][0], caches[i][1], tables, partial, keys, k0.stride(0), k0.stride(1), k0.stride(2),
                tables.stride(0), BLOCK_N=block_n, D=D, PAGE=page, num_warps=4, num_stages=1), calls=len(caches)))
    kv_bytes = 2 * B * ctx_len * Hkv * D * k0.element_size()
    return kv_bytes / (best * 1e-3) / 1e12


def _eager_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def prefill_rows():
    rows = []
    for D, H in [(64, 32), (128, 16)]:
        for causal in [False, True]:
            for S in [1024, 4096, 16384]:
                B = 16384 // S
                q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
                row = {"head_dim": D, "heads": H, "batch": B, "seq": S, "causal": causal}
                out = flash_attention(q, k, v, causal=causal)
                row["fusecc_ms"] = bench(lambda: flash_attention(q, k, v, causal=causal))
                gluon = gluon_prefill_eligible(q, k, v, out, 0)
                tma = tma_prefill_eligible(q, k, v, out, 0)
                row["fusecc_kernel"] = "gluon" if gluon else "tma" if tma else "pointer"
                if gluon:  # one schedule, no autotuning
                    row["fusecc_config"] = (f"2 consumer warpgroups x {flash_attention_gluon.ROWS_PER_CONSUMER} rows, "
                                            f"BLOCK_N {flash_attention_gluon.BLOCK_N}, {flash_attention_gluon.STAGES} K/V stages")
                    with without_gluon():  # the descriptor kernel on the same inputs: what Gluon gains
                        flash_attention(q, k, v, causal=causal)
                        row["fusecc_tma_kernel_ms"] = bench(lambda: flash_attention(q, k, v, causal=causal))
                else:
                    kernel = _flash_attention_tma_kernel if tma else _flash_attention_kernel
                    row["fusecc_config"] = str(getattr(kernel, "best_config", "hand-picked"))
                if tma:  # the pointer kernel on the same inputs: what the descriptors gain
                    with pointer_kernel_only():
                        flash_attention(q, k, v, causal=causal)
                        row["fusecc_pointer_kernel_ms"] = bench(lambda: flash_attention(q, k, v, causal=causal))
                for name, backend in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
                    try:
                        with sdpa_kernel(backend):
                            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            row[f"{name}_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                        row[f"rel_err_vs_{name}"] = _rel_err(out, ref)
                    except RuntimeError as e:  # backend not available for this shape/build
                        row[f"{name}_ms"] = None
                        row[f"{name}_error"] = str(e).splitlines()[0][:200]
                for name in ["fusecc", "fusecc_tma_kernel", "fusecc_pointer_kernel", "sdpa_flash", "sdpa_cudnn"]:
                    ms = row.get(f"{name}_ms")
                    row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12 if ms else None
                for name in ["sdpa_flash", "sdpa_cudnn"]:
                    row[f"vs_{name}"] = row["fusecc_tflops"] / row[f"{name}_tflops"] if row[f"{name}_tflops"] else None
                rows.append(row)
                print(f"prefill d{D} causal={causal} S={S}: {row['fusecc_tflops']:.0f} TFLOP/s "
                      f"(flash {row['sdpa_flash_tflops'] or 0:.0f}, cudnn {row['sdpa_cudnn_tflops'] or 0:.0f}) "
                      f"{row['fusecc_config']}", flush=True)
                del q, k, v, out
    return rows


def decode_rows(copy_tbs):
    rows = []
    Hq, Hkv, D, bs = 32, 8, 128, 16
    free = torch.cuda.mem_get_info()[0]
    for B in [1, 8, 64]:
        for ctx_len in [1024, 8192, 32768]:
            kv_bytes = 2 * B * ctx_len * Hkv * D * 2
            row = {"batch": B, "context": ctx_len, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "block_size": bs,
                   "kv_bytes": kv_bytes}
            if 2.5 * kv_bytes > free:
                row["skipped"] = "does not fit in GPU memory"
                rows.append(row)
                continue
            blocks_per_seq = ctx_len // bs
            num_blocks = B * blocks_per_seq
            # enough distinct caches that every call reads cold K/V (L2 is 50 MB on H100/H200)
            copies = max(1, min(32, -(-256 * 2**20 // kv_bytes)))
            if (copies + 1.5) * kv_bytes > free:
                copies = 1
            caches = [(torch.randn(num_blocks, bs, Hkv, D, device="cuda", dtype=torch.bfloat16),
                       torch.randn(num_blocks, bs, Hkv, D, device="cuda", dtype=torch.bfloat16))
                      for _ in range(copies)]
            k_cache, v_cache = caches[0]
            tables = torch.randperm(num_blocks, device="cuda").reshape(B, blocks_per_seq).to(torch.int32)
            ctx = torch.full((B,), ctx_len, device="cuda", dtype=torch.int32)
            q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
            out = paged_attention(q, k_cache, v_cache, tables, ctx)
            # spot-check correctness on the first sequence against SDPA on the gathered context
            kb = k_cache[tables[0].long()].reshape(-1, Hkv, D).transpose(0, 1)[None]
            vb = v_cache[tables[0].long()].reshape(-1, Hkv, D).transpose(0, 1)[None]
            ref = F.scaled_dot_product_attention(q[:1, :, None].float(), kb.float(), vb.float(), enable_gqa=True)[0, :, 0]
            row["rel_err_seq0"] = _rel_err(out[0], ref)
            row["eager_us"] = bench(lambda: paged_attention(q, k_cache, v_cache, tables, ctx)) * 1e3
            single = torch.cuda.CUDAGraph()
            with torch.cuda.graph(single):
                paged_attention(q, k_cache, v_cache, tables, ctx)
            row["flushed_single_call_us"] = bench(single.replay) * 1e3
            ms = time_in_graph(lambda i: paged_attention(q, *caches[i], tables, ctx, out=out), calls=copies)
            row["fusecc_us"] = ms * 1e3
            row["rotating_caches"] = copies
            row["num_splits"] = choose_num_splits(B, Hkv, ctx_len, num_sms(q.device))
            row["fusecc_config"] = str(getattr(_paged_decode_kernel, "best_config", "hand-picked"))
            row["bandwidth_tbs"] = kv_bytes / (ms * 1e-3) / 1e12
            row["fraction_of_copy"] = row["bandwidth_tbs"] / copy_tbs
            if ctx_len * B <= 8 * 8192:  # the 32 MB-and-under calls, where a call's fixed costs show
                row["paged_gather_tbs"] = paged_gather_bandwidth(caches, tables, ctx_len)
                row["paged_gather_fraction_of_copy"] = row["paged_gather_tbs"] / copy_tbs
            del caches
            row["same_size_read_tbs"] = read_bandwidth(kv_bytes, copies)
            row["fraction_of_same_size_read"] = row["bandwidth_tbs"] / row["same_size_read_tbs"]
            rows.append(row)
            print(f"decode B={B} ctx={ctx_len}: {row['fusecc_us']:.1f} us (eager {row['eager_us']:.1f}) {row['bandwidth_tbs']:.2f} TB/s "
                  f"({100 * row['fraction_of_copy']:.0f}% of copy) splits={row['num_splits']} {row['fusecc_config']}",
                  flush=True)
            del k_cache, v_cache, out
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_tbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_tbs:.2f} TB/s", flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "sm_count": num_sms(torch.device("cuda")),
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "copy_bandwidth_tbs": copy_tbs,
        "prefill": [] if args.skip_prefill else prefill_rows(),
        "decode": [] if args.skip_decode else decode_rows(copy_tbs),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  copy {copy_tbs:.2f} TB/s")
    print("prefill TFLOP/s      fusecc  flash  cudnn  x flash  x cudnn")
    for r in result["prefill"]:
        f = lambda x: f"{x:6.0f}" if x else "     -"  # noqa: E731
        g = lambda x: f"{x:7.2f}" if x else "      -"  # noqa: E731
        print(f"d{r['head_dim']:<3} {'causal' if r['causal'] else 'full  '} S={r['seq']:<6}"
              f"{f(r['fusecc_tflops'])} {f(r['sdpa_flash_tflops'])} {f(r['sdpa_cudnn_tflops'])}"
              f"  {g(r['vs_sdpa_flash'])}  {g(r['vs_sdpa_cudnn'])}")
    print("decode (graph, back to back) us   TB/s   % copy  % same-size read  % paged gather  splits  flushed us")
    for r in result["decode"]:
        if "skipped" in r:
            print(f"B={r['batch']:<3} ctx={r['context']:<6} skipped: {r['skipped']}")
            continue
        print(f"B={r['batch']:<3} ctx={r['context']:<6} {r['fusecc_us']:8.1f} {r['bandwidth_tbs']:7.2f} "
              f"{100 * r['fraction_of_copy']:7.0f}  {100 * r['fraction_of_same_size_read']:16.0f}"
              f"  {100 * r['bandwidth_tbs'] / r['paged_gather_tbs'] if 'paged_gather_tbs' in r else 0:14.0f}  {r['num_splits']:6d}"
              f"  {r['flushed_single_call_us']:8.1f}")


if __name__ == "__main__":
    main()
