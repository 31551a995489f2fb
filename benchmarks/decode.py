"""Decode benchmark (GPU): eager vs inductor (reduce-overhead) vs fusecc (reduce-overhead), one run.

Llama-shaped models with random bf16 weights, a static KV cache (transformers StaticCache), a
128-token prompt (prefilled eagerly, not timed) and 128 greedy decode steps timed end to end.
Also: compile time (first call, cold caches; and warm after torch._dynamo.reset()), kernel
launches per decode step for fusecc (from its dump), logits agreement with eager, and the HBM
roofline from a device-to-device copy measured in the same run.

    python benchmarks/decode.py --configs 1b:1,1b:32,8b:1 --out benchmarks/results/decode.json
"""

from __future__ import annotations

import os
import tempfile

# Cold compile caches for both compilers: fresh directories for this process.
_CACHE_ROOT = tempfile.mkdtemp(prefix="fusecc-bench-")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE_ROOT, "triton"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE_ROOT, "inductor"))
os.environ.setdefault("FUSECC_CACHE_DIR", os.path.join(_CACHE_ROOT, "fusecc"))

import argparse  # noqa: E402
import datetime  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=128),
}
PROMPT, STEPS = 128, 128


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - start)  # read + write


def warm_up_process() -> None:
    """Pay the process's one-time costs before any timed compile, so that they do not land on
    whichever compiler happens to run first: Dynamo/AOTAutograd's first trace, and Triton's
    start-up (its driver utilities are built into the fresh cache directory on first launch).
    Both compilers still share that Triton cache directory (and its per-signature launchers), and
    every configuration after the first finds the kernels of the ones before: only the first
    configuration's "cold" is cold."""
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) + 1)

    x = torch.zeros(1, device="cuda")
    _touch[(1,)](x)
    torch.compile(lambda t: t * 2, backend="aot_eager")(x)
    torch.cuda.synchronize()


def build_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model, config


def run_decode(model, config, step, batch: int, cache):
    """Prefill eagerly, then STEPS greedy decode steps through `step`; returns (seconds, first logits)."""
    with torch.inference_mode():  # the cache's tensors were created under inference mode
        cache.reset()
    generator = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (batch, PROMPT), device="cuda", generator=generator)
    with torch.inference_mode():
        logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:]
        token = logits.argmax(-1)
        first = step(token, cache).float().clone()
        token = first.argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(STEPS - 1):
            token = step(token, cache).argmax(-1)
        torch.cuda.synchronize()
    return time.perf_counter() - start, first


def first_call_seconds(model, config, step, batch: int, cache) -> float:
    with torch.inference_mode():
        cache.reset()
        # made under inference mode like run_decode's tokens: a normal tensor here fails Dynamo's
        # dispatch-key guard on the next call, and every compiler would be timed compiling twice
        token = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
        model(torch.zeros((batch, 4), dtype=torch.long, device="cuda"), past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(token, cache)
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_config(shape: str, batch: int, bandwidth: float, cache_len: int = PROMPT + STEPS + 8) -> dict:
    from transformers import StaticCache

    model, config = build_model(shape)
    cache = StaticCache(config=config, max_cache_len=cache_len)

    def eager_step(token, cache):
        return model(token, past_key_values=cache, use_cache=True).logits

    result: dict = {"shape": shape, "batch": batch, "prompt": PROMPT, "decode_steps": STEPS, "max_cache_len": cache_len}
    n_params = sum(p.numel() for p in model.parameters())
    kv_bytes = (batch * config.num_hidden_layers * 2 * config.num_key_value_heads * (PROMPT + STEPS)
                * config.head_dim * 2)
    step_bytes = n_params * 2 + kv_bytes
    result["params"] = n_params
    result["roofline_tok_s"] = batch * bandwidth / step_bytes

    seconds, eager_first = run_decode(model, config, eager_step, batch, cache)
    result["eager_tok_s"] = batch * (STEPS - 1) / seconds

    dump_dir = tempfile.mkdtemp(prefix=f"fusecc-dump-{shape}-{batch}-")
    # torch.compile takes mode= or options=, not both: cudagraphs=True is fusecc's reduce-overhead.
    fusecc_options = {"cudagraphs": True, "freeze": True}
    for name, make in (("inductor", lambda dump: torch.compile(eager_step, mode="reduce-overhead")),
                       ("fusecc", lambda dump: torch.compile(eager_step, backend="fusecc", options={
                           **fusecc_options, **({"dump_dir": dump_dir} if dump else {})}))):
        try:
            # compile times without dumps (writing them is not compiling)
            torch._dynamo.reset()
            compiled = make(False)
            result[f"{name}_compile_s"] = first_call_seconds(model, config, compiled, batch, cache)
            torch._dynamo.reset()
            compiled = make(False)
            result[f"{name}_compile_warm_s"] = first_call_seconds(model, config, compiled, batch, cache)
            if name == "fusecc":  # the timed run is compiled with a dump: launches per step are read from it
                torch._dynamo.reset()
                compiled = make(True)
            seconds, first = run_decode(model, config, compiled, batch, cache)
            result[f"{name}_tok_s"] = batch * (STEPS - 1) / seconds
            result[f"{name}_rel_err_vs_eager"] = ((first - eager_first).norm() / eager_first.norm()).item()
            if name == "fusecc":
                reports = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(dump_dir, "*", "report.json")))]
                decode_reports = [r["codegen"] for r in reports if "kernel_launches" in r.get("codegen", {})]
                if decode_reports:
                    last = decode_reports[-1]
                    result["fusecc_kernel_launches_per_step"] = last["kernel_launches"]
                    result["fusecc_extern_calls_per_step"] = last["extern_calls"]
                    result["fusecc_codegen_fallbacks"] = last["codegen_fallbacks"]
                result["fusecc_graphs_compiled"] = len(reports)
        except Exception as exc:  # keep the other columns
            result[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    for name in ("eager", "inductor", "fusecc"):
        if f"{name}_tok_s" in result:
            result[f"{name}_fraction_of_roofline"] = result[f"{name}_tok_s"] / result["roofline_tok_s"]
    if "fusecc_tok_s" in result and "inductor_tok_s" in result:
        result["fusecc_vs_inductor"] = result["fusecc_tok_s"] / result["inductor_tok_s"]
    del model, cache
    torch.cuda.empty_cache()
    return result


def run_configs(configs: str, out: str, bench, **header) -> dict:
    """The report of a benchmark over "shape:batch,..." configurations: device, versions, date and
    command, `header`, and `bench(shape, batch)` per configuration, after warm_up_process(). The
    file is rewritten after each configuration, so a later crash keeps the earlier ones."""
    import triton

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        **header,
        "configurations": [],
    }
    warm_up_process()
    for item in configs.split(","):
        shape, batch = item.split(":")
        report["configurations"].append(bench(shape, int(batch)))
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="1b:1,1b:32,8b:1,8b:32", help="shape:batch, comma separated")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    parser.add_argument("--cache-len", type=int, default=PROMPT + STEPS + 8,
                        help="StaticCache max_cache_len; the roofline counts only the K/V of tokens in use")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    report = run_configs(args.configs, args.out,
                         lambda shape, batch: bench_config(shape, batch, bandwidth, args.cache_len),
                         copy_bandwidth_bytes_per_s=bandwidth)
    print(f"{'config':<8} {'eager':>8} {'inductor':>9} {'fusecc':>8} {'x ind':>6} {'roofline':>9} "
          f"{'ind cmp s':>9} {'fcc cmp s':>9} {'fcc warm':>8} {'launch':>6} {'rel err':>8}")
    for r in report["configurations"]:
        print(f"{r['shape']}:{r['batch']:<5} {r.get('eager_tok_s', 0):8.1f} {r.get('inductor_tok_s', 0):9.1f} "
              f"{r.get('fusecc_tok_s', 0):8.1f} {r.get('fusecc_vs_inductor', 0):6.2f} {r['roofline_tok_s']:9.1f} "
              f"{r.get('inductor_compile_s', 0):9.1f} {r.get('fusecc_compile_s', 0):9.1f} "
              f"{r.get('fusecc_compile_warm_s', 0):8.2f} {r.get('fusecc_kernel_launches_per_step', -1):6} "
              f"{r.get('fusecc_rel_err_vs_eager', -1):8.4f}")
        for key in ("inductor_error", "fusecc_error"):
            if key in r:
                print(f"  {key}: {r[key][:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
