"""`fusecc demo`: compile a tiny Llama built in code (random weights, no downloads) with
backend="fusecc", check it against eager, and show what the passes did."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def run_demo(dump_dir: str | None = None) -> int:
    model = tiny_llama()
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24))
    dump_root = dump_dir or tempfile.mkdtemp(prefix="fusecc-demo-")
    compiled = torch.compile(model, backend="fusecc", options={"freeze": True, "dump_dir": dump_root})
    with torch.inference_mode():
        expected = model(input_ids).logits
        start = time.perf_counter()
        actual = compiled(input_ids).logits
        first_call = time.perf_counter() - start
    error = (actual - expected).abs().max().item()
    ok = torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)

    print("fusecc demo: tiny Llama (2 layers, hidden 64, GQA 4/2, vocab 256), fp32, random weights")
    print(f"  first call (Dynamo + capture + passes): {first_call:.2f} s")
    for report_path in sorted(Path(dump_root).glob("*/report.json")):
        report = json.loads(report_path.read_text())
        print(f"  {report['graph']}: fusecc compile {report['compile_seconds'] * 1000:.0f} ms, "
              f"ATen ops {report['ops_aten']} -> {report['ops_final']}, "
              f"{report['num_frozen']} weights frozen, {report['num_sdpa_kept_whole']} SDPA kept whole")
        totals: dict[str, int] = {}
        for rec in report["passes"]:
            for key, value in rec["stats"].items():
                if not key.startswith("refused"):
                    totals[f"{rec['name']}: {key}"] = totals.get(f"{rec['name']}: {key}", 0) + value
        for key, value in sorted(totals.items()):
            print(f"    {key:<55} {value}")
    print(f"  logits vs eager: max abs error {error:.2e} -> {'MATCH' if ok else 'MISMATCH'}")
    print(f"  pass dumps: {dump_root}  (summary: fusecc dump {dump_root})")
    return 0 if ok else 1
