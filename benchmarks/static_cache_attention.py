"""Static-cache decode attention (GPU): one new token attending over a transformers-style StaticCache
of max_cache_len slots of which only the first `used` hold tokens (the rest masked off), as
`torch.compile`d HF models run it. fusecc's flash_attention (its seq_q == 1 split-KV kernel, which
skips the masked tail) vs SDPA with the same boolean mask (PyTorch's default backend choice), same run.

    python benchmarks/static_cache_attention.py --out benchmarks/results/static_cache_attention.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F


def bench(batch: int, max_len: int, used: int, q_heads=32, kv_heads=8, head_dim=128) -> dict:
    import triton.testing

    from fusecc.kernels import flash_attention

    torch.manual_seed(0)
    q = torch.randn(batch, q_heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, max_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = (torch.arange(max_len, device="cuda") < used)[None, None, None, :].expand(batch, 1, 1, max_len)
    out = flash_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    fusecc_ms = triton.testing.do_bench(lambda: flash_attention(q, k, v, attn_mask=mask))
    sdpa_ms = triton.testing.do_bench(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    return {"batch": batch, "max_cache_len": max_len, "used": used, "q_heads": q_heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "fusecc_us": fusecc_ms * 1e3, "sdpa_us": sdpa_ms * 1e3,
            "sdpa_over_fusecc": sdpa_ms / fusecc_ms, "rel_err_vs_sdpa": rel}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/static_cache_attention.json")
    args = parser.parse_args()
    import triton

    rows = [bench(b, L, u) for b, L, u in [(1, 4096, 300), (32, 4096, 300), (32, 4096, 4000), (32, 264, 200)]]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{'batch':>5} {'max_len':>7} {'used':>5} {'fusecc us':>9} {'sdpa us':>8} {'sdpa/fcc':>8} {'rel err':>8}")
    for r in rows:
        print(f"{r['batch']:5d} {r['max_cache_len']:7d} {r['used']:5d} {r['fusecc_us']:9.1f} {r['sdpa_us']:8.1f} "
              f"{r['sdpa_over_fusecc']:8.2f} {r['rel_err_vs_sdpa']:8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
