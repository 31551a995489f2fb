"""fusecc/cuda_graph.py: a recorded call replays on the current contents of its buffers (GPU only;
the compiler's and the runtime's CUDA-graph tests cover its two users)."""

import pytest
import torch

from fusecc.cuda_graph import CapturedCall


@pytest.mark.gpu
def test_a_replay_reads_the_buffers_as_they_are_now_and_reuses_its_outputs():
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    y = x * 2  # warm-up outside the capture (lazy CUDA initialisation must not be recorded)
    pool = torch.cuda.graph_pool_handle()
    captured = CapturedCall(lambda t: t * 2 + 1, (x,), pool)
    x.copy_(torch.full_like(x, 5.0))
    out = captured.replay()
    torch.testing.assert_close(out, torch.full_like(x, 11.0))
    x.fill_(1.0)
    assert captured.replay() is out and out[0].item() == 3.0
    del y
