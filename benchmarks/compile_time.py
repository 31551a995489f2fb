"""Compile time in fresh processes (GPU): what a user waits for between starting Python and the
first decode step of benchmarks/decode.py's models, cold (empty caches) and warm (the caches a
previous process left), for each compiler in the same run:

    dynamo_only      backend="eager": Dynamo's capture alone, the floor of any backend that traces
    aot_eager        Dynamo + AOTAutograd, the graph run as ATen
    inductor         mode="reduce-overhead"; warm = its FX graph / AOTAutograd / Triton caches
    fusecc           torch.compile(backend="fusecc", cudagraphs + freeze); warm = fusecc's graph
                     cache: Dynamo traces, AOTAutograd, passes and codegen are skipped
    fusecc_aot       fusecc.compile_cache.aot_compile(step, example); warm = the stored function:
                     nothing is traced (torch's AOT compile + fusecc's serializable graph)

Every row runs in its own process (`--child`), so imports and one-time initialisation count, as
for a user; each process times `first_call_s`: from the compile call to the first step's logits
(model construction excluded, reported as `build_s`). A cold row starts from empty cache folders,
its warm row reuses them. `--serve` adds the engine's start-up at the 8B shape (what `fusecc-serve`
does before /health answers 200), cold and warm: process start to the first token, weights
excluded, and the first request after start-up against the median of the next ten.

    python -m benchmarks.compile_time --shapes 1b,8b --serve --out benchmarks/results/compile_time.json
    python -m benchmarks.compile_time --shapes 8b --rows "" --serve --out ...   # the engine's start-up only
    python -m benchmarks.compile_time --smoke --out /tmp/compile_time.json     # CPU, tiny shape
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = ("dynamo_only", "aot_eager", "inductor", "fusecc", "fusecc_aot")
COLD_AND_WARM = ("inductor", "fusecc", "fusecc_aot")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, head_dim=16)


# ----------------------------------------------------------------------------------- children


def decode_step(model, token, cache):
    return model(token, past_key_values=cache, use_cache=True).logits


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def build(shape: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from benchmarks.decode import SHAPES

    dims = TINY if shape == "tiny" else SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(**dims, max_position_embeddings=4096, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    cache = StaticCache(config=config, max_cache_len=64)
    return model, cache


def child_compile(row: str, shape: str, batch: int, device: str) -> dict:
    import torch

    start = time.perf_counter()
    model, cache = build(shape, device)
    token = torch.zeros((batch, 1), dtype=torch.long, device=device)
    with torch.inference_mode():
        model(torch.zeros((batch, 4), dtype=torch.long, device=device), past_key_values=cache, use_cache=True)
        token = token.clone()  # made under inference mode, as the calls below (Dynamo guards on it)
        _sync(device)
        build_s = time.perf_counter() - start
        options = {"freeze": True, **({"cudagraphs": True} if device == "cuda" else {})}
        profiler = cProfile.Profile() if row in os.environ.get("COMPILE_TIME_PROFILE_ROWS", "").split(",") else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        if row == "fusecc_aot":
            from fusecc.compile_cache import aot_compile

            step = aot_compile(decode_step, (model, token, cache), options=options)
        elif row == "fusecc":
            step = torch.compile(decode_step, backend="fusecc", options=options)
        elif row == "inductor":
            step = torch.compile(decode_step, mode="reduce-overhead" if device == "cuda" else None)
        else:
            step = torch.compile(decode_step, backend={"dynamo_only": "eager", "aot_eager": "aot_eager"}[row])
        logits = step(model, token, cache)
        _sync(device)
        first_call_s = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        reference = decode_step(model, token, cache)
    from torch._dynamo.utils import counters as dynamo_counters

    from fusecc.compile_cache import counters

    report = {"build_s": build_s, "first_call_s": first_call_s,
              "max_abs_diff_vs_eager": (logits.float() - reference.float()).abs().max().item(),
              "fusecc_counters": dict(counters), "dynamo_unique_graphs": dynamo_counters["stats"]["unique_graphs"]}
    if profiler is not None:  # where the first call's time goes (--profile-rows)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        report["profile"] = text.getvalue()
    return report


def child_serve(shape: str, device: str, process_start: float) -> dict:
    """The engine at `shape` (random weights, the byte tokenizer's vocabulary), built as the server
    builds it, then single-token requests."""
    import torch
    from transformers import LlamaConfig

    from benchmarks.decode import SHAPES
    from fusecc import SamplingParams
    from fusecc.runtime.byte_tokenizer import VOCAB_SIZE, ByteTokenizer
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.engine import LLMEngine
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.llama import LlamaForCausalLM

    dims = dict(TINY if shape == "tiny" else SHAPES[shape], vocab_size=VOCAB_SIZE)
    config = LlamaConfig(**dims, architectures=["LlamaForCausalLM"], max_position_embeddings=4096,
                         rms_norm_eps=1e-5, bos_token_id=ByteTokenizer.bos_token_id,
                         eos_token_id=ByteTokenizer.eos_token_id)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(LlamaForCausalLM, config, dtype, device, 2048, weights=None)
    _sync(device)
    weights_s = time.perf_counter() - start
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(max_model_len=2048, max_num_seqs=32, device=device),
                       eos_token_ids=(ByteTokenizer.eos_token_id,), model_name=f"random-{shape}")
    ready_wall = time.time()

    def one_request(tag: str) -> float:
        begin = time.perf_counter()
        engine.add_request(tag, [65, 66, 67, 68], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        _sync(device)
        return time.perf_counter() - begin

    first = one_request("first")
    first_token_wall = time.time()
    following = [one_request(f"next{i}") for i in range(10)]
    from fusecc.compile_cache import counters

    return {"weights_s": weights_s, "process_start_to_ready_s": ready_wall - process_start,
            "process_start_to_first_token_s": first_token_wall - process_start,
            "process_start_to_first_token_minus_weights_s": first_token_wall - process_start - weights_s,
            "first_request_s": first, "median_next_ten_s": statistics.median(following),
            "first_over_median_next_ten": first / statistics.median(following), "fusecc_counters": dict(counters)}


# ----------------------------------------------------------------------------------- parent


def run_child(args: list[str], caches: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(caches, "triton"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"), FUSECC_CACHE_DIR=os.path.join(caches, "fusecc"),
               BENCH_PROCESS_START=repr(time.time()))
    env.pop("FUSECC_DISABLE_COMPILE_CACHE", None)
    result = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--child", *args], env=env,
                            capture_output=True, text=True)
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    if result.returncode != 0 or line is None:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}",
                "stderr_tail": result.stderr[-3000:]}
    return json.loads(line[len("RESULT "):])


def bench_shape(shape: str, batch: int, device: str, rows: list[str]) -> dict:
    result: dict = {"shape": shape, "batch": batch}
    for row in rows:
        caches = tempfile.mkdtemp(prefix=f"compile-time-{row}-")
        for phase in ("cold", "warm") if row in COLD_AND_WARM else ("cold",):
            label = row if row not in COLD_AND_WARM else f"{row}_{phase}"
            result[label] = run_child(["compile", row, shape, str(batch), device], caches)
            print(f"{shape}:{batch} {label:<18} " + (f"{result[label]['first_call_s']:8.2f} s" if "first_call_s" in
                  result[label] else result[label]["error"][:200]), flush=True)
    for phase in ("cold", "warm"):
        fusecc = result.get(f"fusecc_aot_{phase}", {}).get("first_call_s")
        inductor = result.get(f"inductor_{phase}", {}).get("first_call_s")
        if fusecc and inductor:
            result[f"fusecc_aot_vs_inductor_{phase}"] = fusecc / inductor
    return result


def bench_serve(shape: str, device: str) -> dict:
    caches = tempfile.mkdtemp(prefix="compile-time-serve-")
    out = {"shape": shape}
    for phase in ("cold", "warm"):
        out[phase] = run_child(["serve", shape, device], caches)
        print(f"serve {shape} {phase}: " + json.dumps({k: v for k, v in out[phase].items() if k != "stderr_tail"})[:300],
              flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="1b,8b", help="comma separated: 1b, 8b (benchmarks/decode.py's), tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma separated subset of {','.join(ROWS)}")
    parser.add_argument("--serve", action="store_true", help="also the engine's start-up at the last shape")
    parser.add_argument("--profile-rows", default="", help="comma separated rows whose first call (cold and warm) "
                        "runs under cProfile; the top functions by cumulative time go into the JSON")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, fusecc rows and serve: checks the script")
    parser.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "compile":
            row, shape, batch, device = rest
            report = child_compile(row, shape, int(batch), device)
        else:
            shape, device = rest
            report = child_serve(shape, device, float(os.environ["BENCH_PROCESS_START"]))
        print("RESULT " + json.dumps(report))
        return 0

    import torch

    device = "cpu" if args.smoke else "cuda"
    shapes = ["tiny"] if args.smoke else args.shapes.split(",")
    rows = ["aot_eager", "fusecc", "fusecc_aot"] if args.smoke else [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    os.environ["COMPILE_TIME_PROFILE_ROWS"] = args.profile_rows  # read by the children
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "triton": triton_version, "date": datetime.date.today().isoformat(),
              "command": "python -m benchmarks.compile_time " + " ".join(sys.argv[1:]),
              "what": "first_call_s: compile call to the first decode step's logits, each row in a fresh process; "
                      "warm rows reuse the cache folders of their cold row", "configurations": []}
    for shape in shapes if rows else []:
        report["configurations"].append(bench_shape(shape, args.batch, device, rows))
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.serve or args.smoke:
        report["serve"] = bench_serve(shapes[-1], device)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
