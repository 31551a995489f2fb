"""`fusecc bench serve`: a streaming load generator for an OpenAI-compatible /v1/completions server.

    fusecc bench serve --base-url http://127.0.0.1:8000 --num-requests 200 --input-len 256 \\
        --output-len 128 --request-rate 8 --out result.json --plot latency.png

Dataset: `--num-requests` prompts of exactly `--input-len` random token ids (`--prompt-kind ids`,
ids drawn from [--min-token-id, --max-token-id), valid in any vocabulary of that size) or of
`--input-len` random words (`--prompt-kind words`, length in tokens then depends on the tokenizer).
Every request asks for exactly `--output-len` tokens (ignore_eos). Arrivals: Poisson at
`--request-rate` per second, or `--concurrency` requests always in flight, or all at once.

Per request (client-side clock): TTFT = first chunk with choices - send; ITL = gaps between such
chunks (the server sends one per engine step that produced tokens); TPOT = (E2E - TTFT) / (output tokens - 1); E2E = last chunk - send. Output tokens come from
the server's usage chunk (stream_options.include_usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from fusecc.serve.cli import API_KEY_ENV, bounded

_WORDS = ("the of and to in is was for on that with as by at from his her an which are this be had not it "
          "but were have one all they their when there been who more will about would after into than out "
          "model token cache block server stream batch kernel graph value").split()


class BenchError(Exception):
    """The benchmark cannot start (no server at the URL, a refused key, ...): one line for the user."""


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def make_prompts(n: int, input_len: int, kind: str, rng: random.Random, lo: int, hi: int) -> list:
    if kind == "ids":
        return [[rng.randrange(lo, hi) for _ in range(input_len)] for _ in range(n)]
    return [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(n)]


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict, prompt_len: int) -> RequestResult:
    r = RequestResult(ok=False, prompt_len=prompt_len)
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                body = " ".join((await resp.aread()).decode(errors="replace").split())  # one line, even for HTML
                r.error = f"HTTP {resp.status_code}: {body[:200]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = chunk["error"].get("message", "stream error")
                    return r
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                # One chunk per engine step with new tokens; its text may be empty (a byte-level
                # tokenizer holds back an incomplete UTF-8 character), it is still a token arrival.
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - start
                    else:
                        r.itls.append(now - last)
                    last = now
        r.e2e = (last or time.perf_counter()) - start
        r.ok = last is not None
        if not r.ok:
            r.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    return r


async def _check_server(client: httpx.AsyncClient, base: str, headers: dict, model: str | None,
                        timeout: float) -> str:
    """GET /v1/models once before the load: a server that is not there or refuses the key is one
    BenchError naming the URL, instead of every request failing. Returns the model to ask for."""
    url = f"{base}/v1/models"
    try:
        resp = await client.get(url, headers=headers, timeout=timeout)
    except httpx.ConnectError as exc:
        if _refused(exc):
            raise BenchError(f"{base} refused the connection: is fusecc-serve running?") from None
        raise BenchError(f"cannot connect to {base}: {exc}") from None
    except httpx.TimeoutException:
        raise BenchError(f"{url} did not answer within {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise BenchError(f"{url}: {type(exc).__name__}: {exc}") from None
    answered = f"{base} answered {resp.status_code} {resp.reason_phrase}"
    if resp.status_code in (401, 403):
        hint = ("the API key was not accepted" if headers else f"pass --api-key (or set {API_KEY_ENV})")
        raise BenchError(f"{answered}: {hint}")
    if resp.status_code != 200:
        if model is not None:  # a server without /v1/models: the completions themselves will tell
            return model
        raise BenchError(f"{answered} for GET /v1/models: is it an OpenAI-compatible server? "
                         "(--model NAME skips this lookup)")
    if model is not None:
        return model
    try:
        return resp.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{url} did not answer with a model list ({resp.text[:80]!r}); "
                         "pass --model NAME") from None


def _refused(exc: BaseException) -> bool:
    """Whether ConnectionRefusedError is behind an httpx error (its causes, contexts and, for the
    async client, the exception group of every address tried)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return True
        stack += [x for x in (e.__cause__, e.__context__, *getattr(e, "exceptions", ())) if x is not None]
    return False


def _summary(values: list[float], scale: float = 1e3) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99))}


async def run_benchmark(args: argparse.Namespace) -> tuple[dict, list[RequestResult]]:
    rng = random.Random(args.seed)
    prompts = make_prompts(args.num_requests, args.input_len, args.prompt_kind, rng, args.min_token_id,
                           args.max_token_id)
    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        model = await _check_server(client, base, headers, args.model, min(args.timeout, 60.0))
        url = f"{base}/v1/completions"

        def body(prompt) -> dict:
            return {"model": model, "prompt": prompt, "max_tokens": args.output_len, "min_tokens": args.output_len,
                    "ignore_eos": True, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}

        sem = asyncio.Semaphore(args.concurrency) if args.concurrency else None

        async def limited(p) -> RequestResult:
            plen = len(p) if isinstance(p, list) else args.input_len
            if sem is None:
                return await _one(client, url, body(p), headers, plen)
            async with sem:
                return await _one(client, url, body(p), headers, plen)

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.ensure_future(limited(p)))
            if args.request_rate and args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_url": args.base_url, "model": model,
        "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
        "prompt_kind": args.prompt_kind, "request_rate": args.request_rate, "concurrency": args.concurrency,
        "seed": args.seed, "python": platform.python_version(), "command": args.command_line,
        "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "input_throughput": sum(r.prompt_len for r in done) / duration,
        "total_output_tokens": out_tokens,
        "ttft_ms": _summary([r.ttft for r in done]),
        "tpot_ms": _summary([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _summary([g for r in done for g in r.itls]),
        "e2e_ms": _summary([r.e2e for r in done]),
    }
    return report, list(results)


def plot_latencies(results: list[RequestResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    series = [("TTFT", [r.ttft * 1e3 for r in done]),
              ("TPOT", [r.tpot * 1e3 for r in done if r.tpot is not None]),
              ("ITL", [g * 1e3 for r in done for g in r.itls]),
              ("E2E", [r.e2e * 1e3 for r in done])]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series):
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            for q, style in ((50, "-"), (95, "--"), (99, ":")):
                ax.axvline(np.percentile(values, q), color="tab:red", linestyle=style, label=f"p{q}")
            ax.legend()
        ax.set_title(f"{name} (ms), n={len(values)}")
        ax.set_xlabel("ms")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    # a one-line usage: argparse's own would list every option over ten lines above each error
    p = argparse.ArgumentParser(prog="fusecc bench serve", description=__doc__.split("\n")[0],
                                usage="%(prog)s --base-url URL [options]  (--help lists them)")
    p.add_argument("--base-url", required=True, type=_http_url, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None,
                   help=f"sent as `Authorization: Bearer KEY` (default: ${API_KEY_ENV}, else $OPENAI_API_KEY)")
    p.add_argument("--num-requests", type=bounded(int, 1), default=100)
    p.add_argument("--input-len", type=bounded(int, 1), default=128)
    p.add_argument("--output-len", type=bounded(int, 1), default=128)
    p.add_argument("--prompt-kind", choices=("ids", "words"), default="ids")
    # printable ASCII byte ids: valid in the embedded byte tokenizer (258 ids) and in HF vocabularies
    p.add_argument("--min-token-id", type=bounded(int, 0), default=32)
    p.add_argument("--max-token-id", type=bounded(int, 1), default=127)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=bounded(float, 1e-9), default=None, help="Poisson arrivals per second")
    load.add_argument("--concurrency", type=bounded(int, 1), default=None, help="requests kept in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=bounded(float, 1e-3), default=600.0, help="per-request timeout in seconds")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of the latency distributions here")
    return p


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "fusecc bench serve " + " ".join(sys.argv[1:] if argv is None else argv)
    # `or`: an unset $KEY expanded into --api-key "" means no key, as does an empty variable
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or os.environ.get("OPENAI_API_KEY") or None
    if args.min_token_id >= args.max_token_id:
        parser.error(f"--min-token-id {args.min_token_id} must be below --max-token-id {args.max_token_id}")
    # before the run, not after minutes of load: a report or plot that cannot be written
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{option} {path}: no such folder {os.path.dirname(os.path.abspath(path))}")
    try:
        report, results = asyncio.run(run_benchmark(args))
    except BenchError as exc:
        print(f"fusecc bench serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusecc bench serve: interrupted", file=sys.stderr)
        return 130
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        load = f"rate {args.request_rate}/s" if args.request_rate else f"concurrency {args.concurrency or 'all'}"
        plot_latencies(results, args.plot, f"{report['model']}: {args.input_len} in / {args.output_len} out, {load}")
    keys = ("completed", "failed", "duration_s", "request_throughput", "output_throughput")
    print(" ".join(f"{k}={report[k]:.3f}" if isinstance(report[k], float) else f"{k}={report[k]}" for k in keys))
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = report[name]
        print(f"{name:8s} " + " ".join(f"{k}={v:.2f}" if v is not None else f"{k}=-" for k, v in s.items()))
    for err in report["errors"]:
        print(f"error: {err}")
    return 0 if report["failed"] == 0 else 1
