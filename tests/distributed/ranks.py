"""Run a function on N spawned ranks of a fresh gloo group and collect what each returns.

    results = run_ranks(body, world=2, args=(path,))   # body(tp, *args) -> picklable, per rank

`body` must be importable by name (a module-level function of a test module): spawned children
import it. A rank that raises fails the call with its traceback; a hang is killed after timeout_s.
"""

from __future__ import annotations

import multiprocessing
import traceback

from fusecc.distributed.executor import _free_port


def _rank_main(rank, world, init_method, body, args, queue):
    import torch

    from fusecc.distributed.state import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    try:
        tp = init_distributed("gloo", world_size=world, rank=rank, init_method=init_method, timeout_s=60)
        queue.put((rank, True, body(tp, *args)))
        destroy_distributed()
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(body, world: int, args: tuple = (), timeout_s: float = 180.0) -> list:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, world, init_method, body, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout_s)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
