"""Static-cache decode attention (GPU): one new token attending over a transformers-style StaticCache
of max_cache_len slots of which only the first `used` hold tokens (the rest masked off), as
`torch.compile`d HF models run it. fusecc's flash_attention (its seq_q == 1 split-KV kernel, which
skips the masked tail) vs SDPA with the same boolean mask (PyTorch's default backend choice), same run,
both replayed back to back from a CUDA graph over rotating caches (eager timing would measure Python
launch overhead, not the kernels).

    PYTHONPATH=. python benchmarks/static_cache_attention.py --out benchmarks/results/static_cache_attention.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F


def bench(batch: int, max_len: int, used: int, q_heads=32, kv_heads=8, head_dim=128) -> dict:
    from benchmarks.attention import time_in_graph
    from fusecc.kernels import flash_attention

    torch.manual_seed(0)
    # enough caches that replays read cold K/V (L2 is 50 MB), as a decode step of a real model does:
    # counted from the slots in use (what fusecc reads), within 8 GiB of caches
    cache_bytes = 2 * batch * kv_heads * max_len * head_dim * 2
    used_kv_bytes = 2 * batch * kv_heads * used * head_dim * 2
    copies = max(1, min(16, -(-256 * 2**20 // used_kv_bytes), 8 * 2**30 // cache_bytes))
    q = torch.randn(batch, q_heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    caches = [(torch.randn(batch, kv_heads, max_len, head_dim, device="cuda", dtype=torch.bfloat16),
               torch.randn(batch, kv_heads, max_len, head_dim, device="cuda", dtype=torch.bfloat16))
              for _ in range(copies)]
    mask = (torch.arange(max_len, device="cuda") < used)[None, None, None, :].expand(batch, 1, 1, max_len)
    k, v = caches[0]
    out = flash_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    # timed as compiled graphs run it: calls replayed back to back from one CUDA graph
    fusecc_ms = time_in_graph(lambda i: flash_attention(q, *caches[i], attn_mask=mask), calls=copies)
    sdpa_ms = time_in_graph(
        lambda i: F.scaled_dot_product_attention(q, *caches[i], attn_mask=mask, enable_gqa=True), calls=copies)
    return {"batch": batch, "max_cache_len": max_len, "used": used, "q_heads": q_heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "rotating_caches": copies, "fusecc_us": fusecc_ms * 1e3, "sdpa_us": sdpa_ms * 1e3,
            "sdpa_over_fusecc": sdpa_ms / fusecc_ms, "rel_err_vs_sdpa": rel,
            "fusecc_tbs_of_used_kv": used_kv_bytes / (fusecc_ms * 1e-3) / 1e12}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/static_cache_attention.json")
    args = parser.parse_args()
    import triton

    rows = [bench(b, L, u) for b, L, u in [(1, 4096, 300), (1, 4096, 4000), (32, 4096, 300), (32, 4096, 4000),
                                            (32, 264, 200)]]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{'batch':>5} {'max_len':>7} {'used':>5} {'fusecc us':>9} {'sdpa us':>8} {'sdpa/fcc':>8} {'TB/s used':>9} {'rel err':>8}")
    for r in rows:
        print(f"{r['batch']:5d} {r['max_cache_len']:7d} {r['used']:5d} {r['fusecc_us']:9.1f} {r['sdpa_us']:8.1f} "
              f"{r['sdpa_over_fusecc']:8.2f} {r['fusecc_tbs_of_used_kv']:9.2f} {r['rel_err_vs_sdpa']:8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
