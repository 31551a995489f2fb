"""Run by tests/distributed/test_torchrun.py under torchrun on every rank: `LLM(...,
tensor_parallel_size=WORLD_SIZE)`; ranks > 0 serve rank 0's steps inside LLM() and exit there,
rank 0 generates and writes the token ids as JSON.

    torchrun ... tests/distributed/torchrun_generate.py CHECKPOINT OUT.json
"""

import json
import os
import sys

import torch

from fusecc.llm import LLM
from fusecc.runtime.sampling_params import SamplingParams
from tests.distributed.test_tp_engine import ENGINE
from tests.runtime.hf_checkpoints import prompts

if __name__ == "__main__":
    torch.set_num_threads(1)
    checkpoint, out_path = sys.argv[1:3]
    llm = LLM(checkpoint, tensor_parallel_size=int(os.environ["WORLD_SIZE"]), **ENGINE)
    outputs = llm.generate(prompts(4, seed=5, min_len=10, max_len=40), SamplingParams(temperature=0, max_tokens=12))
    with open(out_path, "w") as f:
        json.dump({"rank": int(os.environ["RANK"]), "tokens": [o.outputs[0].token_ids for o in outputs]}, f)
    llm.engine.runner.shutdown()
