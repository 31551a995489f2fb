"""launch_tuned (fusecc/kernels/launch.py) without autotuning: the hand-picked config, or the
first of the kernel's others that fits when it does not (an fp32 tile can exceed shared memory)."""

import pytest
import triton
from triton.runtime.errors import OutOfResources

from fusecc.kernels.launch import kernel_autotuning, launch_tuned


class FakeAutotuned:
    """Stands for an @triton.autotune kernel: `.configs`, and `.fn[grid](...)` that records launches
    and raises OutOfResources for configs wider than the 'device' allows."""

    def __init__(self, configs, max_block):
        self.configs = configs
        self.max_block = max_block
        self.launched = []
        outer = self

        class Fn:
            def __getitem__(self, grid):
                def launch(*args, BLOCK_N, num_warps, num_stages, **kwargs):
                    if BLOCK_N > outer.max_block:
                        raise OutOfResources(BLOCK_N * 1024, outer.max_block * 1024, "shared memory")
                    outer.launched.append((BLOCK_N, kwargs.get("HEAD_DIM")))
                return launch

        self.fn = Fn()


def _configs():
    return [triton.Config({"BLOCK_N": n}, num_warps=4, num_stages=2) for n in (128, 256, 64, 32)]


def test_hand_picked_config_runs_when_it_fits():
    kernel = FakeAutotuned(_configs(), max_block=512)
    with kernel_autotuning(False):
        launch_tuned(kernel, (1,), (), {"HEAD_DIM": 64}, kernel.configs[0])
    assert kernel.launched == [(128, 64)]


def test_falls_back_to_the_first_config_that_fits_and_remembers_it():
    kernel = FakeAutotuned(_configs(), max_block=64)
    with kernel_autotuning(False):
        launch_tuned(kernel, (1,), (), {"HEAD_DIM": 128}, kernel.configs[0])
        assert kernel.launched == [(64, 128)]  # 128 and 256 did not fit; 64 is the next in order
        kernel.max_block = 512  # a new search would now pick 128: the remembered 64 is launched
        launch_tuned(kernel, (1,), (), {"HEAD_DIM": 128}, kernel.configs[0])
        launch_tuned(kernel, (1,), (), {"HEAD_DIM": 96}, kernel.configs[0])  # other constexprs: searched
    assert kernel.launched == [(64, 128), (64, 128), (128, 96)]


def test_raises_when_no_config_fits():
    kernel = FakeAutotuned(_configs(), max_block=16)
    with kernel_autotuning(False), pytest.raises(OutOfResources):
        launch_tuned(kernel, (1,), (), {"HEAD_DIM": 32}, kernel.configs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("seq_q,head_dim", [(300, 128), (300, 256), (1, 256)])
def test_gpu_fp32_tiles_that_do_not_fit_fall_back(seq_q, head_dim):
    # fp32 doubles the hand-picked bf16 tiles' shared memory: 128-dim prefill and 256-dim decode
    # tiles no longer fit on an H100/H200, and a compiled graph (no autotuning) must still run
    import torch

    from fusecc.kernels import flash_attention
    from fusecc.kernels.reference import attention_reference

    torch.manual_seed(0)
    q = torch.randn(1, 8, seq_q, head_dim, device="cuda")
    k = torch.randn(1, 2, 1000, head_dim, device="cuda")
    v = torch.randn(1, 2, 1000, head_dim, device="cuda")
    with kernel_autotuning(False):
        out = flash_attention(q, k, v, causal=True)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-3)
