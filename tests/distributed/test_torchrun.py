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
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fusecc-tp-test",
         "--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", "0",
         str(ROOT / "tests/distributed/torchrun_generate.py"), str(tmp_path / "ckpt"), str(out)],
        env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    try:
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
        logs = [node.communicate()[0] for node in nodes]  # what each node printed before it hung
        raise AssertionError("the torchrun nodes did not finish in 240 s:\n" + "\n".join(
            f"--- node {i}:\n{log[-3000:]}" for i, log in enumerate(logs))) from None
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(logs)
    import json

    got = json.loads(out.read_text())
    assert got["rank"] == 0
    reference = LLMEngine.from_engine_args(str(tmp_path / "ckpt"), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = run_engine(reference, [(str(i), p, params) for i, p in enumerate(prompts(4, seed=5, min_len=10,
                                                                                         max_len=40))])
    assert got["tokens"] == [expected[str(i)].outputs[0].token_ids for i in range(4)]
