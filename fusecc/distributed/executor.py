"""The engine's side of tensor parallelism: it schedules, the ranks run the model.

    runner = make_executor(model_path, config, dtype, device)   # in LLMEngine.from_engine_args
    runner.config, runner.vocab_size                             # as a ModelRunner's
    sampled = runner.execute(scheduler_output, eos_ids)         # rank 0's SamplerOutput

Two ways to get the ranks:
- MultiprocExecutor (a plain `LLM(..., tensor_parallel_size=N)` / `fusecc-serve`): the engine
  process spawns N worker processes (spawn method), ranks 0..N-1 of a fresh process group over
  tcp://127.0.0.1, one GPU each; the engine process is no rank, so a collective that fails or
  NCCL's watchdog aborting a rank never takes the engine down with it. Steps go to rank 0 over a
  Pipe, encoded as changes since the last step (step_codec.py); rank 0 broadcasts them to the
  others (fusecc/distributed/worker.py).
- DriverExecutor (under torchrun, one or several machines): every torchrun process runs the same
  command; rank 0's process is the engine and runs rank 0 itself, the others become workers inside
  `make_executor` and exit when rank 0 stops.

Faults (MultiprocExecutor): while waiting for rank 0's answer the engine polls every worker; a
worker that exited, reported an error, or a step not answered within `step_timeout_s` stops every
worker (SIGTERM, then SIGKILL after STOP_GRACE_S) and raises WorkerFailedError, which fails the
engine's step (and so every open request; the server's /health answers 503). Workers ignore
SIGINT (Ctrl-C is the engine's: its exit stops them) and exit when the engine process dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
import weakref

import torch

from fusecc.distributed import worker as worker_mod
from fusecc.distributed.shard import shard_range
from fusecc.distributed.state import DEFAULT_TIMEOUT_S, destroy_distributed, init_distributed, torchrun_env
from fusecc.distributed.step_codec import StepEncoder
from fusecc.runtime.config import EngineConfig

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
POLL_S = 0.1
EXIT_GRACE_S = 2.0
DEFAULT_STEP_TIMEOUT_S = 300.0  # a step may compile a new shape; a hang is reported after this
DEFAULT_START_TIMEOUT_S = 1800.0  # load + compile + warm-up + CUDA graphs of a 70B shard


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died, failed or hung; every worker has been stopped."""


def check_tp_model(model, gguf_path, hf_config, config: EngineConfig) -> None:
    """ValueError at start for what tensor parallelism does not cover."""
    if config.tensor_parallel_size == 1:
        return
    from fusecc.runtime.models.registry import resolve_model_impl

    if model is None or gguf_path is not None:
        raise ValueError("tensor_parallel_size > 1 needs a Hugging Face checkpoint folder (not a GGUF file or "
                         "the default model)")
    if resolve_model_impl(hf_config, config.model_impl) != "fusecc":
        raise ValueError("tensor_parallel_size > 1 supports fusecc's native models only (model_impl='fusecc')")
    world = config.tensor_parallel_size
    _check_quantized_split(hf_config, config, world)
    heads = hf_config.num_attention_heads
    if heads % world:
        raise ValueError(f"num_attention_heads={heads} is not divisible by tensor_parallel_size={world}")
    shard_range(getattr(hf_config, "num_key_value_heads", None) or heads, 0, world, "num_key_value_heads")
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(hf_config, key, None):  # MoE experts and shared experts split like dense MLPs
            shard_range(getattr(hf_config, key), 0, world, key)


def _check_quantized_split(hf_config, config: EngineConfig, world: int) -> None:
    """A quantized model splits where its packed words and scale groups allow: each rank's input
    columns of o_proj and down_proj a multiple of the group size (and of 8 for int4 words)."""
    from fusecc.quantization.config import resolve_quantization
    from fusecc.runtime.models.llama import attention_shape

    quant = resolve_quantization(config.quantization, hf_config)
    if quant is None:
        return
    heads, _, head_dim = attention_shape(hf_config)
    per = 1 if quant.group_size == -1 else quant.group_size  # input columns one stored column covers
    if quant.bits == 4:
        per = max(per, 8)  # groups are multiples of 8
    down_inputs = [getattr(hf_config, k, None) for k in ("intermediate_size", "moe_intermediate_size",
                                                          "shared_expert_intermediate_size")]
    for what, inputs in [("o_proj", heads * head_dim)] + [("down_proj", n) for n in down_inputs if n]:
        if (inputs // world) % per:
            raise ValueError(f"quantization {quant.method!r} with tensor_parallel_size={world}: {what} has "
                             f"{inputs // world} input columns per rank, not a multiple of {per} (scale groups"
                             f"{' and packed int4 words' if quant.bits == 4 else ''} cannot straddle ranks)")


def make_executor(model_path: str, config: EngineConfig, dtype: torch.dtype, device: torch.device):
    if torchrun_env():
        return DriverExecutor.from_checkpoint(str(model_path), config, dtype, device)
    return MultiprocExecutor(str(model_path), config, dtype, device)


class MultiprocExecutor:
    def __init__(self, model_path: str, config: EngineConfig, dtype: torch.dtype, device: torch.device,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 collective_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        world = config.tensor_parallel_size
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size={world} but only {torch.cuda.device_count()} GPUs are visible")
        ctx = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.step_timeout_s = step_timeout_s
        self._encoder = StepEncoder()
        self.procs, self.conns = [], []
        self._pending: dict[int, list] = {rank: [] for rank in range(world)}
        # stops the workers when the executor is collected or the interpreter exits (Ctrl-C included)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        for rank in range(world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_mod.worker_main, name=f"fusecc-tp-rank{rank}",
                               args=(rank, world, init_method, model_path, config, dtype, device.type, theirs,
                                     collective_timeout_s, os.getpid()))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        ready = [self._receive(rank, start_timeout_s, "start") for rank in range(world)]
        self.config, info = ready[0][1], ready[0][2]
        self.device, self.dtype = torch.device(info["device"]), info["dtype"]
        self.vocab_size = _vocab_size(model_path)
        self.num_graph_replays = 0

    def execute(self, out, eos_token_ids=()):
        if not self._finalizer.alive:
            raise WorkerFailedError("the tensor-parallel workers were stopped")
        try:
            self.conns[0].send(("step", self._encoder.encode(out, eos_token_ids)))
        except OSError as exc:
            self._fail(f"rank 0 is gone ({exc})")
        _, sampled, self.num_graph_replays = self._receive(0, self.step_timeout_s, "step")
        return sampled

    def shutdown(self) -> None:
        """Stop the workers: rank 0 tells the others, all leave the process group; any still
        running after STOP_GRACE_S are killed."""
        if self._finalizer.alive:
            try:
                self.conns[0].send(("stop",))
                for proc in self.procs:
                    proc.join(STOP_GRACE_S)
            except OSError:
                pass
            self._finalizer()

    def _receive(self, rank: int, timeout_s: float, what: str):
        """The next message of `rank`, watching every worker meanwhile (an error message or an
        exit of any rank fails; others' regular messages wait in _pending)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._pending[rank]:
                return self._pending[rank].pop(0)
            self.conns[rank].poll(POLL_S)
            errors = {}
            for r, conn in enumerate(self.conns):
                while conn.poll(0):
                    try:
                        message = conn.recv()
                    except EOFError:
                        break
                    if message[0] == "error":
                        errors[r] = message[1]
                    else:
                        self._pending[r].append(message)
            dead = self._dead(grace_s=EXIT_GRACE_S if errors else 0.0)
            if errors or (dead and not self._pending[rank]):
                self._fail(*_failure_report(what, dead, errors))
            if not self._pending[rank] and time.monotonic() > deadline:
                self._fail(f"tensor-parallel rank {rank} did not answer the {what} within {timeout_s:.0f} s "
                           f"(hung worker?)")

    def _dead(self, grace_s: float) -> dict:
        """Workers that have exited. With a grace: a peer's error ("connection reset") can come
        before the exit of the rank that caused it is visible; wait a little to name that one."""
        deadline = time.monotonic() + grace_s
        while True:
            dead = {r: p for r, p in enumerate(self.procs) if p.exitcode is not None}
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(POLL_S / 10)

    def _fail(self, message: str, details: str = ""):
        """Stop every worker and raise; the ranks' tracebacks go to the log, not the message (it
        is what /health and each open request report)."""
        self._finalizer()
        if details:
            logger.error("%s; the workers' tracebacks:%s", message, details)
        raise WorkerFailedError(f"{message}; all workers were stopped")


def _failure_report(what: str, dead: dict, errors: dict) -> tuple[str, str]:
    """(One line naming the cause: a rank that exited comes first, the others' errors are usually
    its peers losing their connection to it; the ranks' tracebacks.)"""
    causes = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode}" for r, p in dead.items()]
    causes += [f"rank {r} failed: {text.strip().splitlines()[-1][:300]}" for r, text in errors.items() if r not in dead]
    details = "".join(f"\n--- {text}" for text in errors.values())
    return f"tensor-parallel worker failure during {what}: {'; '.join(causes)}", details


def _stop(procs: list, conns: list) -> None:
    """SIGTERM every worker still running, SIGKILL those left after STOP_GRACE_S, reap all."""
    for proc in procs:
        if proc.exitcode is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


class DriverExecutor:
    """Under torchrun: this process is one rank (`worker`). Rank 0 is the engine's runner."""

    def __init__(self, worker: worker_mod.Worker, vocab_size: int) -> None:
        assert worker.tp.rank == 0, "ranks > 0 run worker.follow_steps"
        self.worker, self.config, self.vocab_size = worker, worker.config, vocab_size
        self._encoder = StepEncoder()
        self.device, self.dtype = worker.tp.device, worker.runner.dtype
        self._finalizer = weakref.finalize(self, _stop_and_leave, worker.channel)

    @classmethod
    def from_checkpoint(cls, model_path: str, config: EngineConfig, dtype: torch.dtype,
                        device: torch.device) -> "DriverExecutor":
        """Rank 0 returns the executor; the other ranks follow rank 0's steps here and exit the
        process (exit_process(0): no interpreter teardown) when it stops."""
        tp = init_distributed(world_size=config.tensor_parallel_size, device=device)
        worker = worker_mod.Worker.from_checkpoint(model_path, config, dtype, tp)
        if tp.rank != 0:
            worker_mod.follow_steps(worker)
            # leave the process group, then the process without the interpreter's teardown, where
            # gloo's threads can kill a rank with SIGABRT while rank 0 waits for it (exit_process)
            destroy_distributed(barrier=True)  # rank 0 meets it in _stop_and_leave
            worker_mod.exit_process(0)
        return cls(worker, _vocab_size(model_path))

    @property
    def num_graph_replays(self) -> int:
        return self.worker.runner.num_graph_replays

    def execute(self, out, eos_token_ids=()):
        try:  # the others get the encoded step; this rank runs the scheduler's own objects
            self.worker.channel.send(self._encoder.encode(out, eos_token_ids))
            return self.worker.runner.execute(out, eos_token_ids)
        except RuntimeError as exc:  # a collective with a dead or hung peer
            raise WorkerFailedError(f"tensor-parallel step failed: {exc}") from exc

    def shutdown(self, leave_group: bool = True) -> None:
        """Stop the followers, then leave the process group (every rank meets in its barrier). With
        leave_group=False the ranks stay in it, for a caller that goes on with the group (another
        engine on the same ranks, as benchmarks/tp.py runs one per shape)."""
        if not leave_group and self._finalizer.alive:
            self._finalizer.detach()
            worker_mod.stop_followers(self.worker.channel)
        self._finalizer()


def _stop_and_leave(channel) -> None:
    """Rank 0 under torchrun, at shutdown: the others stop following, then this rank leaves the group."""
    worker_mod.stop_followers(channel)
    destroy_distributed(barrier=True)


def _vocab_size(model_path: str) -> int:
    from fusecc.runtime.loader import load_config

    return load_config(model_path).vocab_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
