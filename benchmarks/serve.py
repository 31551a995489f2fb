"""Serving benchmark (GPU): fusecc-serve on a Llama-1B-shape model with random bf16 weights, loaded by
`fusecc bench serve` at two Poisson request rates. One run.

    python benchmarks/serve.py --out benchmarks/results/serve.json            # 1B shape, rates 4 and 16 req/s
    python benchmarks/serve.py --model DIR --rates 2,8 --num-requests 64       # an existing checkpoint

Without --model it writes a throwaway HF checkpoint (transformers LlamaForCausalLM, seeded random
init, safetensors) plus a byte-level tokenizer covering the whole 128256-id vocabulary, so the engine's
ordinary loader path (config.json, safetensors, tokenizer.json) is what is measured. Prompts are random
token ids of exactly --input-len; every request generates exactly --output-len tokens (ignore_eos).
If the server does not come up in its default (compiled) mode, it is retried with --enforce-eager and
the result records which mode ran and why.

The GPU machine has no package registry and lacks the serve dependencies: download a cp312
wheelhouse here first, carry it (`.whl/` is git-ignored), install it there:

    .venv/bin/pip download --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all: \
        -d .whl/serve fastapi==0.165.0 uvicorn==0.54.0 prometheus-client httpx==0.28.1 matplotlib==3.11.2
    # run(carry=[".whl"]):
    pip install -q --no-index --find-links .whl/serve fastapi uvicorn prometheus-client httpx matplotlib \
        && PYTHONPATH=. python3 benchmarks/serve.py --out $OUT/serve.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHAPE_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, head_dim=64)
BOS, EOS = 128000, 128001


def write_checkpoint(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE_1B, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=BOS, eos_token_id=EOS, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    write_tokenizer(path)


def write_tokenizer(path: Path) -> None:
    """Byte-level BPE without merges: ids 0..255 are bytes, every other id decodes to `<|tN|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({f"<|t{i}|>": i for i in range(len(vocab), SHAPE_1B["vocab_size"])})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"<|t{BOS}|>", eos_token=f"<|t{EOS}|>")
    fast.save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, extra: list[str], log_path: Path, timeout: float):
    cmd = [sys.executable, "-m", "fusecc.serve.cli", "--model", str(model), "--port", str(port),
           "--served-model-name", "llama-1b-shape-random", *extra]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, time.monotonic() - start, " ".join(cmd)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    return None, time.monotonic() - start, " ".join(cmd)


def stop(proc) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def bench(url: str, args, extra: list[str], out: Path, plot: Path | None, seed: int) -> dict:
    """One `fusecc bench serve` run. Each run gets its own seed: runs that replayed the same random
    prompts would hit the prefix cache left by the previous one and report a TTFT no cold request sees."""
    cmd = [sys.executable, "-m", "fusecc.cli", "bench", "serve", "--base-url", url, "--input-len",
           str(args.input_len), "--output-len", str(args.output_len), "--seed", str(seed), "--out", str(out), *extra]
    if plot is not None:
        cmd += ["--plot", str(plot)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.bench_timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    print(proc.stdout, proc.stderr, flush=True)
    result = json.loads(out.read_text())
    result["command"] = "fusecc bench serve " + " ".join(cmd[5:])
    return result


def server_counters(url: str) -> dict[str, float]:
    """The server's token, preemption and prefix-cache counters from /metrics."""
    metrics = httpx.get(url + "/metrics", timeout=10).text
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in metrics.splitlines()
            if ln.startswith(("fusecc_num_preemptions_total", "fusecc_prefix_cache",
                              "fusecc_generation_tokens_total", "fusecc_prompt_tokens_total"))}


def versions() -> dict:
    import torch
    import transformers
    import triton

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": dev, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: write a random 1B-shape one)")
    p.add_argument("--rates", default="4,16", help="Poisson request rates, comma separated")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--server-args", default="", help="extra fusecc-serve arguments")
    p.add_argument("--start-timeout", type=float, default=240.0)
    p.add_argument("--bench-timeout", type=float, default=300.0)
    p.add_argument("--out", default="benchmarks/results/serve.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fusecc-serve-bench-"))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "fusecc-serve, Llama-1B shape (random bf16 weights)", **versions(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "script": "python benchmarks/serve.py " + " ".join(sys.argv[1:]), "shape": SHAPE_1B,
                    "input_len": args.input_len, "output_len": args.output_len, "runs": []}
    model = Path(args.model) if args.model else work / "llama-1b-random"
    if not args.model:
        t0 = time.monotonic()
        write_checkpoint(model)
        result["checkpoint_write_s"] = round(time.monotonic() - t0, 1)

    base = ["--max-model-len", str(args.max_model_len), *args.server_args.split()]
    port = free_port()
    proc, startup, cmd = None, 0.0, ""
    for mode, extra in (("compiled", base), ("enforce_eager", [*base, "--enforce-eager"])):
        log_path = work / f"server-{mode}.log"
        proc, startup, cmd = start_server(model, port, extra, log_path, args.start_timeout)
        if proc is not None:
            result.update(mode=mode, server_command=cmd, server_startup_s=round(startup, 1))
            break
        tail = log_path.read_text(errors="replace")[-3000:]
        result.setdefault("failed_modes", {})[mode] = {"startup_s": round(startup, 1), "log_tail": tail}
        print(f"server failed to start in mode {mode}:\n{tail}", flush=True)
    if proc is None:
        out_path.write_text(json.dumps(result, indent=2))
        return 1
    url = f"http://127.0.0.1:{port}"
    try:
        # Warm-up (not recorded): first-use compilation of batch shapes, allocator growth.
        bench(url, args, ["--num-requests", "32", "--concurrency", "32"], work / "warmup.json", None, seed=1000)
        for index, rate in enumerate(float(r) for r in args.rates.split(",")):
            plot = out_path.with_name(f"serve_rate{rate:g}.png")
            before = server_counters(url)
            run = bench(url, args, ["--num-requests", str(args.num_requests), "--request-rate", str(rate)],
                        work / f"rate{rate:g}.json", plot, seed=index)
            after = server_counters(url)
            run["plot"] = str(plot)
            # what the server counted during this run alone (prefix-cache hits should be ~0)
            run["server_counter_deltas"] = {name: after[name] - before.get(name, 0.0) for name in after}
            result["runs"].append(run)
            out_path.write_text(json.dumps(result, indent=2))  # keep what is done if a later rate dies
        result["server_metrics"] = server_counters(url)
    finally:
        result["server_exit_code"] = stop(proc)
        result["server_log_tail"] = (work / f"server-{result.get('mode', 'compiled')}.log").read_text(
            errors="replace")[-2000:]
    out_path.write_text(json.dumps(result, indent=2))
    for run in result["runs"]:
        print(f"rate {run['request_rate']}/s: {run['request_throughput']:.2f} req/s, "
              f"{run['output_throughput']:.0f} out tok/s, TTFT p50 {run['ttft_ms']['p50']:.1f} ms "
              f"p99 {run['ttft_ms']['p99']:.1f} ms, TPOT p50 {run['tpot_ms']['p50']:.1f} ms "
              f"p99 {run['tpot_ms']['p99']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
