"""One tensor-parallel rank: its model shard, its ModelRunner (KV pool of its own heads), and the
step loop. Rank 0 drives: it receives each step (a SchedulerOutput, encoded by step_codec.py) from the
engine, broadcasts it to the other ranks over the gloo control group (StepChannel: one buffer, one
collective a step), and every rank decodes it and runs the same ModelRunner.execute on it. The logits
are all-gathered (distributed/vocab.py), so every rank samples the same tokens from the same seeded
generators; rank 0's are the ones returned.

    worker = Worker.from_checkpoint(path, config, dtype, tp)  # load the shard, compile, warm up
    sampled = drive_step(worker, message)                    # rank 0 (message: step_codec's encoding)
    follow_steps(worker)                                     # ranks > 0, until rank 0 stops
    stop_followers(worker.channel)                           # rank 0, at shutdown

`worker_main` is the entry of a process spawned by fusecc/distributed/executor.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from fusecc.distributed.state import TPGroup, destroy_distributed, init_distributed
from fusecc.distributed.step_codec import StepDecoder
from fusecc.runtime.config import EngineConfig

PARENT_POLL_S = 1.0
# a step message up to this size is one collective (a decode step of 256 sequences is ~14 KB)
STEP_BUFFER_BYTES = 32 << 10


class Worker:
    def __init__(self, model, config: EngineConfig, tp: TPGroup) -> None:
        """model: this rank's shard (fusecc/distributed/sharding.py), on tp.device."""
        from fusecc.runtime.model_runner import ModelRunner

        self.tp = tp
        self.runner = ModelRunner(model, config)
        self.decoder = StepDecoder()
        self.channel = StepChannel(tp)  # rank 0 sends each step on it, the others receive
        # Each rank sized its own pool (CUDA: from its free memory); the engine schedules the
        # smallest, which every rank holds.
        blocks = torch.tensor([self.runner.config.num_kv_blocks])
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=tp.cpu_group)
        self.config = dataclasses.replace(self.runner.config, num_kv_blocks=int(blocks.item()))

    @classmethod
    def from_checkpoint(cls, model_path: str, config: EngineConfig, dtype: torch.dtype, tp: TPGroup) -> "Worker":
        from fusecc.distributed.sharding import build_sharded_model
        from fusecc.quantization.config import resolve_quantization
        from fusecc.runtime.loader import iter_weights, load_config
        from fusecc.runtime.models.registry import model_class

        hf_config = load_config(model_path)
        quant = resolve_quantization(config.quantization, hf_config)
        model = build_sharded_model(model_class(hf_config), hf_config, dtype, tp.device, config.max_model_len,
                                    iter_weights(model_path), tp, quant)
        return cls(model, config, tp)

    def run(self, message):
        """One step from its encoded message (fusecc/distributed/step_codec.py)."""
        out, eos_token_ids = self.decoder.decode(message)
        return self.runner.execute(out, eos_token_ids)


class StepChannel:
    """Rank 0 -> the other ranks, over the gloo control group: each step message pickled into a
    preallocated buffer of `capacity` bytes (an 8-byte length, then the pickle) and broadcast as that
    one tensor; a message that does not fit (a prefill of long prompts) sends its rest as a second
    one. Rank 0's broadcasts are asynchronous: it goes on to run the step while gloo's thread sends,
    and waits for a send only before it reuses the buffer (the next send; by then the others have
    received it, having run that step's collectives with rank 0), so the step's critical path on
    rank 0 holds a pickle and an enqueue, not a round trip; an error of a send (a dead peer) is
    raised there, one step later. At world size 1 the message is pickled and framed all the same
    but not enqueued (no peer). (broadcast_object_list, used before, made two blocking collectives
    a step, a size then the bytes, plus a slow tensor conversion of the pickle: ~0.2 ms a step.)

        channel = StepChannel(tp)
        channel.send(message)      # rank 0
        message = channel.receive()   # ranks > 0
        channel.flush()             # rank 0: wait until every send has gone (shutdown)
    """

    HEADER = 8

    def __init__(self, tp: TPGroup, capacity: int = STEP_BUFFER_BYTES) -> None:
        self.tp, self.capacity = tp, capacity
        self._bytes = bytearray(capacity)
        self._view = memoryview(self._bytes)
        self._tensor = torch.frombuffer(self._bytes, dtype=torch.uint8)  # shares _bytes' memory
        self._in_flight: list = []  # rank 0: (work, tensor) of sends not waited for yet
        self._root = dist.BroadcastOptions()  # rootRank 0: the group's ProcessGroup is called directly,
        # without dist.broadcast's Python checks (a third of the enqueue's host time)

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        n, room = len(data), self.capacity - self.HEADER
        self.flush()  # the buffer is free again
        view = self._view
        view[:self.HEADER] = n.to_bytes(self.HEADER, "little")
        view[self.HEADER:self.HEADER + min(n, room)] = memoryview(data)[:room]
        if self.tp.size == 1:  # no one to send to: the message is made and framed as for N ranks, not sent
            return
        self._in_flight.append((self.tp.cpu_group.broadcast([self._tensor], self._root), None))
        if n > room:
            rest = torch.frombuffer(bytearray(memoryview(data)[room:]), dtype=torch.uint8)
            self._in_flight.append((self.tp.cpu_group.broadcast([rest], self._root), rest))

    def flush(self) -> None:
        in_flight, self._in_flight = self._in_flight, []
        for work, _ in in_flight:
            work.wait()

    def receive(self):
        self.tp.cpu_group.broadcast([self._tensor], self._root).wait()
        view, room = self._view, self.capacity - self.HEADER
        n = int.from_bytes(view[:self.HEADER], "little")
        if n <= room:
            return pickle.loads(view[self.HEADER:self.HEADER + n])
        rest = bytearray(n - room)
        self.tp.cpu_group.broadcast([torch.frombuffer(rest, dtype=torch.uint8)], self._root).wait()
        return pickle.loads(bytes(view[self.HEADER:]) + rest)


def drive_step(worker: Worker, message):
    """Rank 0: send the step to the other ranks, then run it here too."""
    worker.channel.send(message)
    return worker.run(message)


def follow_steps(worker: Worker) -> None:
    """Ranks > 0: run every step rank 0 sends, until it sends None (shutdown)."""
    while (message := worker.channel.receive()) is not None:
        worker.run(message)


def stop_followers(channel: StepChannel) -> None:
    """Rank 0, at shutdown: the others leave follow_steps once they get this."""
    channel.send(None)
    channel.flush()


def to_cpu(obj):
    """Tensors inside (dataclasses, lists, tuples, dicts) moved to the CPU, to cross a pipe."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose engine process died (SIGKILL, crash) exits instead of waiting in a collective."""
    def watch():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="fusecc-parent-watch").start()


def worker_main(rank: int, world_size: int, init_method: str, model_path: str, config: EngineConfig,
                dtype: torch.dtype, device: str, conn, timeout_s: float, parent_pid: int) -> None:
    """A spawned rank. Messages on `conn` (a Pipe to the engine): this process sends ("ready",
    config, info) once loaded, or ("error", text) on any failure; rank 0 then receives ("step",
    out, eos_ids) and answers ("ok", sampled, num_graph_replays), until ("stop",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle: it stops us
    if device == "cpu":  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    _exit_with_parent(parent_pid)
    code = 0
    try:
        tp = init_distributed(world_size=world_size, rank=rank, init_method=init_method, device=device,
                              timeout_s=timeout_s)
        worker = Worker.from_checkpoint(model_path, config, dtype, tp)
        conn.send(("ready", worker.config, {"device": str(tp.device), "dtype": dtype}))
        if rank != 0:
            follow_steps(worker)
            return
        while True:
            message = conn.recv()
            if message[0] == "stop":
                stop_followers(worker.channel)
                return
            sampled = drive_step(worker, message[1])
            conn.send(("ok", to_cpu(sampled), worker.runner.num_graph_replays))
    except EOFError:  # the engine closed its end: nothing to report to
        code = 1
    except BaseException:
        code = 1
        try:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        except OSError:
            pass
    finally:
        if code == 0:
            destroy_distributed(barrier=True)  # every rank gets here on a clean stop
    exit_process(code)  # on failure without destroy: a peer may be dead, and the engine stops the others


def exit_process(code: int) -> None:
    """End a rank's process now, its work done (or failed): flush, then os._exit, skipping the
    interpreter's teardown. Even after destroy_process_group, gloo's C++ threads can still hold work
    objects whose tensors reference Python; freed during finalization they take the GIL of a dying
    interpreter and the rank dies of SIGABRT ("terminate called without an active exception"), which
    torchrun reports as a failed run (seen in tests/distributed/test_torchrun.py under load; PyTorch
    PR 179291 describes the mechanism)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
