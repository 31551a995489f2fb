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
    return run_engine_demo() if ok else 1


def run_engine_demo() -> int:
    """The engine on the embedded default model (random weights, byte tokenizer): its text is noise,
    but paged KV, continuous batching, the fusecc-compiled forward and sampling all run for real."""
    from fusecc import LLM, SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only add synchronisation on a 2-core machine
    try:
        return _engine_demo(LLM, SamplingParams)
    finally:
        torch.set_num_threads(threads)


def _engine_demo(LLM, SamplingParams) -> int:
    start = time.perf_counter()
    llm = LLM(max_model_len=256, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=32, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=3), use_tqdm=False)  # compile outside the timing
    setup = time.perf_counter() - start
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\nfusecc engine demo: {llm.engine.model_name} on {llm.engine.runner.device}, "
          f"setup + compile {setup:.1f} s (random weights: the text is noise; the point is the machinery)")
    for o in outputs:
        print(f"  {o.prompt!r} -> {o.outputs[0].text[:48]!r} ({o.outputs[0].finish_reason})")
    print(f"  {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} output tok/s; {llm.engine.stats()}")
    return 0 if tokens == len(prompts) * params.max_tokens else 1
