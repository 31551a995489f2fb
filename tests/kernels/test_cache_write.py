"""fusecc.kernels.write_kv_cache: new K/V land in their slots, -1 slots and other slots untouched."""

import pytest
import torch

from fusecc.kernels import write_kv_cache
from fusecc.kernels.reference import write_kv_cache_reference


def _check(T, num_blocks, block_size, Hkv, D, dtype, device="cpu"):
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    # k, v as strided slices of one fused projection output [T, 2, Hkv, D]
    kv = torch.randn(T, 2, Hkv, D, device=device).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[::3] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_reference(k, v, k_ref, v_ref, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = slots[slots >= 0]
    assert torch.equal(k_cache.view(-1, Hkv, D)[written], k[slots >= 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hkv,D", [(2, 32), (3, 24)])
def test_write(dtype, Hkv, D):
    torch.manual_seed(0)
    _check(T=13, num_blocks=6, block_size=4, Hkv=Hkv, D=D, dtype=dtype)


def test_rejects_bad_slot_mapping():
    k = torch.randn(4, 2, 16)
    cache = torch.zeros(2, 4, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, k, cache, cache.clone(), torch.zeros(3, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("Hkv,D", [(8, 128), (8, 80)])
def test_gpu_bf16(Hkv, D):
    torch.manual_seed(0)
    _check(T=4000, num_blocks=512, block_size=16, Hkv=Hkv, D=D, dtype=torch.bfloat16, device="cuda")
