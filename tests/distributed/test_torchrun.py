"""Across machines: two torchrun "nodes" of one process each on this machine (c10d rendezvous,
gloo) run tests/distributed/torchrun_generate.py, the same code a two-machine run uses (the
README's commands with --rdzv-endpoint on the first machine); rank 0's greedy tokens equal
tensor_parallel_size=1's."""

import os
import subprocess
import sys
from pathlib import Path

from fusecc.distributed.executor import _free_port
from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from tests.distributed.test_tp_engine import ENGINE
from tests.runtime.hf_checkpoints import prompts, run_engine, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_two_torchrun_nodes_match_one_process(tmp_path):
    save_tiny_checkpoint("llama", tmp_path / "ckpt")
    out = tmp_path / "out.json"
    codes, logs = _run_two_nodes(tmp_path, out)
    if any(code != 0 and "Address already in use" in log for code, log in zip(codes, logs)):
        # the free port was taken between choosing it and the host binding it (tests run in
        # parallel): a race of this test's set-up, not a failure of the code under test
        codes, logs = _run_two_nodes(tmp_path, out)
    assert codes == [0, 0], "\n".join(f"--- node {i} (exit {c}):\n{log[-3000:]}" for i, (c, log) in
                                      enumerate(zip(codes, logs)))
    import json

    got = json.loads(out.read_text())
    assert got["rank"] == 0
    reference = LLMEngine.from_engine_args(str(tmp_path / "ckpt"), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = run_engine(reference, [(str(i), p, params) for i, p in enumerate(prompts(4, seed=5, min_len=10,
                                                                                         max_len=40))])
    assert got["tokens"] == [expected[str(i)].outputs[0].token_ids for i in range(4)]


def _run_two_nodes(tmp_path, out) -> tuple[list, list[str]]:
    """Both nodes' exit codes (None: killed) and output. A node that fails ends the other (it would
    wait for its peer until the rendezvous timeout); both are killed after 240 s."""
    import time

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # output into files, not pipes: a pipe nobody reads while we wait would block a talkative node
    log_paths = [tmp_path / f"node{node}-{port}.log" for node in range(2)]
    log_files = [open(path, "w") for path in log_paths]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fusecc-tp-test",
         "--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", "0",
         str(ROOT / "tests/distributed/torchrun_generate.py"), str(tmp_path / "ckpt"), str(out)],
        env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT) for node, log in enumerate(log_files)]
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            codes = [node.poll() for node in nodes]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
            node.wait()
        for log in log_files:
            log.close()
    logs = [path.read_text(errors="replace") for path in log_paths]
    return [node.returncode if node.returncode is not None and node.returncode >= 0 else None
            for node in nodes], logs

