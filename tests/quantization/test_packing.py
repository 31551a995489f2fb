"""Checkpoint packings -> fusecc's layouts: AWQ and GPTQ tensors packed here, value by value, from the
formats' descriptions, must unpack to the same integers; on-the-fly quantization stays within half a step."""

import pytest
import torch

from fusecc.quantization.packing import (awq_to_fusecc, expand_fp8_scale, gptq_to_fusecc, quantize_fp8,
                                         quantize_int4, quantize_int8)
from tests.quantization.packers import awq_pack, gptq_pack_cols, gptq_pack_rows, our_int4



def test_awq_round_trip():
    g = torch.Generator().manual_seed(0)
    N, K, G = 24, 64, 32
    q = torch.randint(0, 16, (N, K), generator=g)
    z = torch.randint(0, 16, (N, K // G), generator=g)
    s = torch.rand(K // G, N, generator=g).half()
    qweight, scales, zeros = awq_to_fusecc(awq_pack(q.t()), awq_pack(z.t()), s)
    assert qweight.shape == (N, K // 8) and qweight.dtype == torch.int32
    assert torch.equal(our_int4(qweight, K), q)
    assert torch.equal(zeros, z.float()) and torch.equal(scales, s.float().t())


@pytest.mark.parametrize("v1", [True, False])
def test_gptq_4bit_round_trip(v1):
    g = torch.Generator().manual_seed(1)
    N, K, G = 16, 64, 32
    q = torch.randint(0, 16, (N, K), generator=g)
    z = torch.randint(1, 16, (N, K // G), generator=g)  # v1 stores z - 1
    s = torch.rand(K // G, N, generator=g).half()
    stored_z = (z - 1) if v1 else z
    qweight, scales, zeros = gptq_to_fusecc(gptq_pack_rows(q.t(), 4), gptq_pack_cols(stored_z.t(), 4), s, 4, v1)
    assert torch.equal(our_int4(qweight, K), q)
    assert torch.equal(zeros, z.float()) and torch.equal(scales, s.float().t())


def test_gptq_8bit_round_trip():
    g = torch.Generator().manual_seed(2)
    N, K, G = 8, 64, 32
    q = torch.randint(0, 256, (N, K), generator=g)
    z = torch.randint(1, 256, (N, K // G), generator=g)
    s = torch.rand(K // G, N, generator=g).half()
    qweight, scales, zeros = gptq_to_fusecc(gptq_pack_rows(q.t(), 8), gptq_pack_cols((z - 1).t(), 8), s, 8, True)
    assert qweight.dtype == torch.int8
    # signed storage: the differences q - z, which are what the kernel uses, are unchanged
    assert torch.equal(qweight.float() - zeros.repeat_interleave(G, 1), (q - z.repeat_interleave(G, 1)).float())


def test_fp8_block_scales_expand_per_row():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # 2 block rows of a 200 x 256 weight
    e = expand_fp8_scale(s, 200, 128)
    assert e.shape == (200, 2) and torch.equal(e[127], s[0]) and torch.equal(e[128], s[1])
    assert torch.equal(expand_fp8_scale(torch.tensor(0.5), 3, -1), torch.full((3, 1), 0.5))
    with pytest.raises(ValueError, match="blocks"):
        expand_fp8_scale(s, 300, 128)


def test_on_the_fly_quantization_is_within_half_a_step():
    torch.manual_seed(3)
    w = torch.randn(16, 200)
    q8, s8 = quantize_int8(w)
    assert ((q8.float() * s8 - w).abs() <= s8 / 2 + 1e-6).all()
    q4, s4, z4 = quantize_int4(w, 128)  # 200 = a full group and a short one
    assert s4.shape == (16, 2)
    q = our_int4(q4, 200).float()
    g = torch.arange(200) // 128
    assert ((q - z4[:, g]) * s4[:, g] - w).abs().le(s4[:, g] / 2 + 1e-6).all()
    w8, sf = quantize_fp8(w)
    # e4m3: 3 mantissa bits (relative step 2**-3), subnormal steps 2**-9 of the scale
    assert ((w8.float() * sf - w).abs() <= w.abs() * 2 ** -4 + sf * 2 ** -10 + 1e-7).all()
