"""Tensor-parallel benchmark (issue 22's run): one command per machine, every ratio against a
baseline measured in the same run.

    torchrun --nproc-per-node 2 benchmarks/tp.py --out benchmarks/results/tp.json      # TP2 (TP1 baseline on GPU 0)
    torchrun --nproc-per-node 4 benchmarks/tp.py --out benchmarks/results/tp4.json     # TP4
    torchrun --nproc-per-node 4 benchmarks/tp.py --shapes 70b --skip-baseline --out benchmarks/results/tp_70b.json
    python benchmarks/tp.py --tp 1 --out benchmarks/results/tp.json                    # one GPU: NCCL path vs plain
    python benchmarks/tp.py --smoke --tp 2 --out /tmp/tp_smoke.json                    # CPU, gloo, tiny shape

Per shape (Llama-8B by default, random weights; bf16 on GPU): the plain engine on rank 0's GPU
(the baseline: no process group, no collectives; the TP1 figures) and the tensor-parallel engine
over every rank (rank 0 schedules and drives, the others follow its broadcast steps, as under
`torchrun ... fusecc-serve --tensor-parallel-size N`), each measured for
- batch-1 decode tok/s (a 128-token prompt, 128 greedy tokens; decode-only steps timed),
- offline throughput on benchmarks/throughput.py's workload (256 requests, 128-512-token prompts,
  128 output tokens, EOS ignored);
and, once per run: all-reduce latency and bus bandwidth over the TP group (the decode message
size up to 256 MiB), each GPU's copy bandwidth and the HBM roofline of batch-1 decode for all
the GPUs together (weights bytes / summed copy bandwidth). `--tp 1` runs the distributed code
path at world size 1 (NCCL group, all-reduces in the compiled graph, CUDA graphs around them)
against the plain engine: the "at most 3% slower" check. Where a target is missed, the step
timings (host vs device wait, prefill vs decode) say where time goes; `--profile` adds a torch
profiler table of TP decode steps per rank 0 (all-reduce vs GEMM vs attention kernels).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.decode import SHAPES as DECODE_SHAPES  # noqa: E402
from benchmarks.engine_profile import profile_decode  # noqa: E402
from benchmarks.throughput import make_prompts, step_timing_summary, sync, warm_up  # noqa: E402

SHAPES = {
    **DECODE_SHAPES,
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, head_dim=128),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, head_dim=16),
}
DECODE_PROMPT, DECODE_TOKENS = 128, 128


def hf_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       architectures=["LlamaForCausalLM"], tie_word_embeddings=False)


def weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the full model's weights: what one batch-1 decode step reads (the KV is small)."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    return (2 * v * h + layers * per_layer + h) * torch.finfo(dtype).bits // 8


@torch.no_grad()
def randomise(model, seed: int) -> None:
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0) if "norm" in name else p.zero_()
        else:
            p.normal_(0, 0.02, generator=g)


def measured_max_model_len(prompts: list, output: int) -> int:
    """The max_model_len measure() needs: its longest prompt (or the decode prompt) and output."""
    return max(max(len(p) for p in prompts), DECODE_PROMPT) + max(output, DECODE_TOKENS) + 8


def engine_config(args, max_model_len: int, world: int):
    from fusecc.runtime.config import EngineConfig

    return EngineConfig(max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=world,
                        num_kv_blocks=args.num_kv_blocks)


def measure(engine, vocab: int, prompts: list, output: int, device) -> dict:
    """Batch-1 decode, then offline throughput, on one engine."""
    from fusecc.runtime.sampling_params import SamplingParams

    warm_up(engine, vocab, prompts[:4])
    g = torch.Generator().manual_seed(3)
    engine.add_request("decode", torch.randint(0, vocab, (DECODE_PROMPT,), generator=g).tolist(),
                       SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True))
    engine.step()  # the prefill
    before = engine.stats().step_timings
    while engine.has_unfinished_requests():
        engine.step()
    after = engine.stats().step_timings
    steps, seconds = after.decode_steps - before.decode_steps, after.decode_seconds - before.decode_seconds
    result = {"decode_bs1_tok_s": steps / seconds, "decode_bs1_ms_per_token": 1000 * seconds / steps}
    params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True, output_kind="final_only")
    before = engine.stats()
    sync(device)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"t{i}", p, params)
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
    sync(device)
    seconds = time.perf_counter() - start
    after = engine.stats()
    result.update(throughput_tok_s=tokens / seconds, throughput_seconds=seconds, throughput_tokens=tokens,
                  preemptions=after.num_preemptions - before.num_preemptions, kv_blocks=after.num_kv_blocks,
                  step_timings=step_timing_summary(before.step_timings, after.step_timings))
    return result


def all_reduce_figures(tp, hidden: int, dtype: torch.dtype, smoke: bool) -> list[dict]:
    """Latency and bus bandwidth (2 (n-1)/n x bytes / time, NCCL's convention) of dist.all_reduce."""
    import torch.distributed as dist

    sizes = [hidden * torch.finfo(dtype).bits // 8, 1 << 20] + ([] if smoke else [16 << 20, 256 << 20])
    out = []
    for size in sizes:
        x = torch.ones(size // (torch.finfo(dtype).bits // 8), dtype=dtype, device=tp.device)
        iters = 5 if smoke else (200 if size <= 1 << 20 else 20)
        for _ in range(3):
            dist.all_reduce(x)
        sync(tp.device)
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        sync(tp.device)
        t = (time.perf_counter() - start) / iters
        n = tp.size
        bus = 2 * (n - 1) / n * size / t / 1e9 if n > 1 else None
        out.append({"bytes": size, "latency_us": 1e6 * t, "bus_gb_s": bus})
    return out


def run_shape(shape: str, tp, args, report: dict, save) -> None:
    import torch.distributed as dist

    from fusecc.distributed.executor import DriverExecutor
    from fusecc.distributed.sharding import build_sharded_model
    from fusecc.distributed.worker import Worker, follow_steps
    from fusecc.runtime.byte_tokenizer import ByteTokenizer
    from fusecc.runtime.engine import LLMEngine
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.llama import LlamaForCausalLM

    config = hf_config(shape)
    dtype = torch.float32 if tp.device.type == "cpu" else torch.bfloat16
    prompts = make_prompts(config.vocab_size, n=args.num_requests)
    if args.smoke:
        prompts = [p[:24] for p in prompts]
    output = args.output_len
    max_model_len = measured_max_model_len(prompts, output)
    entry = {"shape": shape, "world_size": tp.size, "dtype": str(dtype),
             "weight_gib": weight_bytes(config, dtype) / 2**30}
    if not args.skip_baseline:  # the plain engine on rank 0's device, the others wait
        if tp.rank == 0:
            model = build_model(LlamaForCausalLM, config, dtype, tp.device, max_model_len, None)
            randomise(model, 0)
            engine = LLMEngine(model, ByteTokenizer(), engine_config(args, max_model_len, 1), model_name=shape)
            entry["baseline_plain_engine"] = measure(engine, config.vocab_size, prompts, output, tp.device)
            engine = model = None
            torch._dynamo.reset()  # its caches hold the compiled graph and with it the frozen weights
            gc.collect()
            if tp.device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier(group=tp.cpu_group)
    model = build_sharded_model(LlamaForCausalLM, config, dtype, tp.device, max_model_len, None, tp)
    randomise(model, tp.rank)
    worker = Worker(model, engine_config(args, max_model_len, tp.size), tp)
    if tp.rank != 0:
        follow_steps(worker)
    else:
        engine = LLMEngine(None, ByteTokenizer(), worker.config, runner=DriverExecutor(worker, config.vocab_size),
                           model_name=shape)
        entry["tensor_parallel"] = measure(engine, config.vocab_size, prompts, output, tp.device)
        if args.profile and tp.device.type == "cuda":
            entry["tensor_parallel_decode_profile"] = profile_decode(engine, list(range(1, DECODE_PROMPT)))
        engine.runner.shutdown(leave_group=False)  # the followers leave follow_steps; the group stays
        base = entry.get("baseline_plain_engine")
        if base:
            for key in ("decode_bs1_tok_s", "throughput_tok_s"):
                entry[f"{key}_ratio_vs_plain"] = entry["tensor_parallel"][key] / base[key]
    report["shapes"].append(entry)
    worker = model = None
    gc.collect()
    save()


def run_rank(rank: int, world: int, init_method: str | None, args) -> None:
    import torch.distributed as dist

    from fusecc.distributed.state import destroy_distributed, init_distributed

    device = "cpu" if args.smoke else "cuda"
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    tp = init_distributed(world_size=world, rank=None if init_method is None else rank, init_method=init_method,
                          device=device, timeout_s=args.collective_timeout)
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "torch": torch.__version__, "world_size": tp.size, "backend": dist.get_backend(), "shapes": []}
    if tp.device.type == "cuda":
        import triton

        from benchmarks.decode import copy_bandwidth

        report.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
        bandwidths = [None] * tp.size
        dist.all_gather_object(bandwidths, copy_bandwidth(), group=tp.cpu_group)
        report["copy_bandwidth_gb_s_per_gpu"] = [b / 1e9 for b in bandwidths]
    else:
        report["device"] = "cpu"

    def save():
        if tp.rank == 0:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)

    shapes = ["tiny"] if args.smoke else args.shapes.split(",")
    report["all_reduce"] = all_reduce_figures(tp, SHAPES[shapes[0]]["hidden_size"],
                                              torch.float32 if args.smoke else torch.bfloat16, args.smoke)
    save()
    for shape in shapes:
        try:
            run_shape(shape, tp, args, report, save)
        except Exception:
            report["shapes"].append({"shape": shape, "error": traceback.format_exc()})
            save()
            raise
    if "copy_bandwidth_gb_s_per_gpu" in report:
        for entry in report["shapes"]:
            tp_figures = entry.get("tensor_parallel")
            if tp_figures:
                total = sum(report["copy_bandwidth_gb_s_per_gpu"]) * 1e9
                entry["hbm_roofline_decode_bs1_tok_s"] = total / (entry["weight_gib"] * 2**30)
                entry["decode_bs1_fraction_of_roofline"] = (tp_figures["decode_bs1_tok_s"]
                                                            / entry["hbm_roofline_decode_bs1_tok_s"])
    save()
    destroy_distributed(barrier=True)  # collective: no rank leaves while another still waits on it


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/tp.json")
    ap.add_argument("--tp", type=int, default=None, help="world size without torchrun (spawns the ranks)")
    ap.add_argument("--shapes", default="8b", help="comma separated: 1b, 8b, 70b")
    ap.add_argument("--skip-baseline", action="store_true", help="no plain single-GPU engine (70B does not fit)")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shape, eager, a few requests")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--collective-timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.enforce_eager, args.max_num_seqs, args.max_num_batched_tokens = True, 8, 64
        args.num_requests = args.num_requests or 6
        args.output_len = args.output_len or 4
    args.num_requests = args.num_requests or 256
    args.output_len = args.output_len or 128
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args)
        return
    world = args.tp or 1
    from fusecc.distributed.executor import _free_port

    init_method = f"tcp://127.0.0.1:{_free_port()}"
    if world == 1:
        run_rank(0, 1, init_method, args)
        return
    torch.multiprocessing.spawn(run_rank, args=(world, init_method, args), nprocs=world)


if __name__ == "__main__":
    main()
