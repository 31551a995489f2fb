"""fusecc.kernels.quant_matmul (W4A16 / W8A16) against a float64 dequantize-then-matmul reference built
here from the layout the module documents: int4 nibble i of word j of row n is k = 8j + i;
W[n, k] = (q[n, k] - zero[n, k // group]) * scale[n, k // group]."""

import pytest
import torch

from fusecc.kernels import quant_matmul
from fusecc.kernels.quant_matmul import DEQUANTIZE_MIN_ROWS, dequantize_weight, weight_only_matmul


def pack_nibbles_along_k(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> int32 [N, ceil(K/8)], written one nibble at a time."""
    N, K = q.shape
    words = [[0] * ((K + 7) // 8) for _ in range(N)]
    for n in range(N):
        for k in range(K):
            words[n][k // 8] |= int(q[n, k]) << (4 * (k % 8))
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


def make_weights(bits, N, K, group, zeros, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else -(-K // group)
    if bits == 4:
        q = torch.randint(0, 16, (N, K), generator=g)
        qweight = pack_nibbles_along_k(q)
    else:
        q = torch.randint(-128, 128, (N, K), generator=g)
        qweight = q.to(torch.int8)
    scales = torch.rand(N, groups, generator=g) * 0.05 + 0.01
    z = (torch.randint(0, 16 if bits == 4 else 20, (N, groups), generator=g).float()) if zeros else None
    col_group = torch.arange(K) // (K if group == -1 else group)
    w64 = q.double() - (z.double()[:, col_group] if zeros else 0.0)
    w64 = w64 * scales.double()[:, col_group]
    return qweight, scales, z, w64


@pytest.mark.parametrize("bits,group,zeros", [(4, 32, True), (4, 64, True), (4, 128, True), (8, -1, False),
                                              (8, 32, True)])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_reference(bits, group, zeros, M, dtype):
    N, K = 40, 160  # N not a multiple of the 32-wide tile; K not of 128
    qweight, scales, z, w64 = make_weights(bits, N, K, group, zeros)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = weight_only_matmul(x, qweight, scales, z, bits, group, bias)
    ref = x.double() @ w64.t() + bias.double()
    assert out.dtype == dtype and out.shape == (M, N)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("bits,group,zeros", [(4, 32, True), (4, 128, True), (8, -1, False), (8, 32, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_then_matmul_path_matches_float64_reference(bits, group, zeros, dtype):
    N, K = 40, 160
    qweight, scales, z, w64 = make_weights(bits, N, K, group, zeros, seed=3)
    w = dequantize_weight(qweight, scales, z, bits, group, K, dtype)
    assert w.dtype == dtype
    torch.testing.assert_close(w.double(), w64.to(dtype).double(), rtol=1e-6, atol=0)  # one rounding to dtype
    x = torch.randn(20, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = weight_only_matmul(x, qweight, scales, z, bits, group, bias, path="dequantize")
    ref = x.double() @ w64.t() + bias.double()
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_past_the_threshold_take_the_dequantize_path(bits, monkeypatch):
    calls = []
    real = quant_matmul.dequantize_weight
    monkeypatch.setattr(quant_matmul, "dequantize_weight", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setitem(quant_matmul.DEQUANTIZE_MIN_ROWS, bits, 24)  # small, for the interpreter
    qweight, scales, z, w64 = make_weights(bits, 16, 64, 32, True, seed=4)
    for M in (17, 23, 24, 30):
        out = weight_only_matmul(torch.randn(M, 64), qweight, scales, z, bits, 32)
        assert out.shape == (M, 16)
    assert calls == [torch.float32, torch.float32]  # M = 24 and 30 only
    assert DEQUANTIZE_MIN_ROWS[bits] > 16


@pytest.mark.parametrize("bits,group,zeros", [(4, 32, True), (4, 128, True), (4, 128, False), (8, -1, False),
                                              (8, 32, True), (4, -1, True)])  # -1: one group, one reduction
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_row_gemv_matches_float64_reference(bits, group, zeros, split_k, dtype):
    # odd N, K not a multiple of the K tile, a short last group; splits whose edges fall inside K
    N, K = 37, 200
    qweight, scales, z, w64 = make_weights(bits, N, K, group, zeros, seed=5)
    x = torch.randn(1, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = weight_only_matmul(x, qweight, scales, z, bits, group, bias, split_k=split_k)
    ref = x.double() @ w64.t() + bias.double()
    assert out.dtype == dtype and out.shape == (1, N)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_paths_are_chosen_by_rows_and_can_be_forced():
    from fusecc.kernels.quant_matmul import weight_only_path

    for bits in (4, 8):
        first = DEQUANTIZE_MIN_ROWS[bits]
        assert [weight_only_path(m, bits) for m in (1, 2, 16, first - 1, first)] == [
            "gemv", "tiles", "tiles", "tiles", "dequantize"]
    qweight, scales, z, w64 = make_weights(4, 16, 64, 32, True, seed=6)
    x = torch.randn(1, 64)
    ref = x.double() @ w64.t()
    for path in ("gemv", "tiles", "dequantize"):
        out = weight_only_matmul(x, qweight, scales, z, 4, 32, path=path)
        torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-4 * ref.abs().max().item())
    with pytest.raises(ValueError, match="gemv for one row"):
        weight_only_matmul(torch.randn(2, 64), qweight, scales, z, 4, 32, path="gemv")


@pytest.mark.parametrize("group,zeros,K", [(32, True, 200), (128, False, 200), (-1, True, 203)])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", ["FMA_PLANES", "BIASED_PLANES"])
def test_int4_gemv_by_nibble_planes_matches_float64_reference(group, zeros, K, split_k, dtype, form, monkeypatch):
    # the GEMV's other int4 tiles (8 nibble planes, made float by conversions or as bias + q; autotuned
    # against the unpacked one on a GPU), forced; the biased form runs its pure-Triton twin here
    from fusecc.kernels import quant_gemv

    kernel = quant_gemv._weight_only_gemv
    force_int4_form(monkeypatch, kernel, form)
    N = 37
    qweight, scales, z, w64 = make_weights(4, N, K, group, zeros, seed=9)
    x = torch.randn(1, K).to(dtype)
    out = weight_only_matmul(x, qweight, scales, z, 4, group, split_k=split_k, path="gemv")
    ref = x.double() @ w64.t()
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("group,zeros,K", [(128, True, 256), (128, False, 200), (-1, True, 203)])
@pytest.mark.parametrize("M,split_k,form,dtype,tol", [
    *[(M, split_k, "FMA_PLANES", dtype, tol) for M, split_k in [(1, 1), (5, 2), (16, 1)]
      for dtype, tol in [(torch.float32, 2e-4), (torch.float16, 2e-2)]],
    # no weight is rounded to fp16 here: the error is the fp16 output's rounding (bias + q in half
    # precision only; fp16 because the interpreter's bf16 dot is broken; it runs the PTX's Triton twin);
    # 40 rows: the prefill tiles' biased configs
    *[(M, split_k, "BIASED_PLANES", torch.float16, 2e-3) for M, split_k in [(1, 1), (5, 2), (16, 1), (40, 1)]]])
def test_int4_tile_planes_match_float64_reference(group, zeros, K, M, split_k, form, dtype, tol, monkeypatch):
    # the int4 tiles' other forms (8 dots, one per nibble plane: dequantized by FMA, or bias + q
    # multiplied raw with the bias and zero taken off per row and group after the dots), forced; a GPU
    # autotunes them against the unpacked tile
    kernel = quant_matmul._decode_kernel if M <= quant_matmul.DECODE_MAX_ROWS else quant_matmul._prefill_kernel
    force_int4_form(monkeypatch, kernel, form)
    N = 37
    qweight, scales, z, w64 = make_weights(4, N, K, group, zeros, seed=10)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = weight_only_matmul(x, qweight, scales, z, 4, group, bias, split_k=split_k, path="tiles")
    ref = x.double() @ w64.t() + bias.double()
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_biased_planes_are_refused_for_fp32_activations():
    from fusecc.kernels import quant_matmul

    configs = quant_matmul._decode_kernel.configs
    kept = quant_matmul._fitting_planes(configs, 4, 128, torch.float32)
    assert kept and all(c.kwargs["PLANES"] != quant_matmul.BIASED_PLANES for c in kept)
    kept = quant_matmul._fitting_planes(configs, 4, 128, torch.bfloat16)
    assert any(c.kwargs["PLANES"] == quant_matmul.BIASED_PLANES for c in kept)


def test_one_row_takes_the_path_timed_faster_once_per_weight_shape(monkeypatch):
    from fusecc.kernels import quant_matmul

    timed = []

    def fake_timer(run):  # runs each path once (both must work) and makes tiles the faster
        out = run()
        timed.append(out)
        return 1.0 if len(timed) % 2 == 0 else 2.0  # ONE_ROW_PATHS order: gemv, then tiles

    monkeypatch.setattr(quant_matmul, "_time_one_row", fake_timer)
    monkeypatch.setattr(quant_matmul, "_ONE_ROW_CHOICE", {})
    qweight, scales, z, w64 = make_weights(4, 16, 64, 32, True, seed=7)
    x = torch.randn(1, 64)
    assert quant_matmul.one_row_path(x, qweight, scales, z, 4, 32, None) == "gemv"  # CPU: not timed
    assert timed == []
    assert quant_matmul.one_row_path(x, qweight, scales, z, 4, 32, None, measure=True) == "tiles"
    assert len(timed) == 2
    torch.testing.assert_close(timed[0], timed[1], rtol=2e-4, atol=2e-4 * timed[0].abs().max().item())
    assert quant_matmul.one_row_path(x, qweight, scales, z, 4, 32, None, measure=True) == "tiles"
    assert len(timed) == 2  # chosen once per shape
    other = make_weights(4, 24, 64, 32, True, seed=8)
    quant_matmul.one_row_path(x, *other[:3], 4, 32, None, measure=True)
    assert len(timed) == 4


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_decode_split_k_partials_sum_to_the_result(split_k):
    # odd K and N, a short last group: the split edges and the masks all matter
    bits, group, N, K = 4, 32, 37, 200
    qweight, scales, z, w64 = make_weights(bits, N, K, group, True, seed=1)
    x = torch.randn(2, K)
    out = weight_only_matmul(x, qweight, scales, z, bits, group, split_k=split_k)
    ref = x.double() @ w64.t()
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-4 * ref.abs().max().item())


def test_int8_odd_k():
    qweight, scales, _, w64 = make_weights(8, 19, 45, -1, False, seed=2)
    x = torch.randn(5, 45)
    ref = x.double() @ w64.t()
    torch.testing.assert_close(weight_only_matmul(x, qweight, scales, None, 8, -1).double(), ref,
                               rtol=2e-4, atol=2e-4 * ref.abs().max().item())


def test_rejects_a_mismatched_layout():
    qweight, scales, z, _ = make_weights(4, 16, 64, 32, True)
    with pytest.raises(ValueError, match="int4 qweight must be int32"):
        weight_only_matmul(torch.randn(1, 64), qweight.t().contiguous(), scales, z, 4, 32)
    with pytest.raises(ValueError, match="scales must be float32"):
        weight_only_matmul(torch.randn(1, 64), qweight, scales.half(), z, 4, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, -1)])
@pytest.mark.parametrize("M", [1, 16, 40, 333, 1100])  # decode, fused prefill, dequantize + cuBLAS (int4 / int8)
def test_gpu_bf16_real_sizes(bits, group, M):
    N, K = 4096, 4096
    qweight, scales, z, w64 = make_weights(bits, N, K, group, bits == 4) if bits == 8 else \
        _fast_int4(N, K, group)
    x = torch.randn(M, K, device="cuda").bfloat16()
    out = weight_only_matmul(x, qweight.cuda(), scales.cuda(), None if z is None else z.cuda(), bits, group)
    ref = x.float() @ w64.float().cuda().t()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["UNPACKED", "FMA_PLANES", "BIASED_PLANES"])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("zeros", [True, False])
def test_gpu_int4_tile_forms_real_sizes(form, M, zeros, monkeypatch):
    # each int4 form of the decode tiles forced (autotuning would test only the fastest), bf16 at a real
    # size; BIASED_PLANES runs its inline PTX here (the interpreter runs its pure-Triton twin)
    kernel = quant_matmul._decode_kernel
    force_int4_form(monkeypatch, kernel, form)
    N, K = 4096, 4096
    qweight, scales, z, w64 = _fast_int4(N, K, 128)
    if not zeros:  # the same nibbles, symmetric
        q = ((qweight.long().unsqueeze(-1) >> torch.arange(0, 32, 4)) & 0xF).reshape(N, K)
        z, w64 = None, q.double() * scales.double()[:, torch.arange(K) // 128]
    x = torch.randn(M, K, device="cuda").bfloat16()
    out = weight_only_matmul(x, qweight.cuda(), scales.cuda(), None if z is None else z.cuda(), 4, 128,
                             path="tiles")
    ref = x.double() @ w64.cuda().t()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["UNPACKED", "FMA_PLANES", "BIASED_PLANES"])
@pytest.mark.parametrize("group", [128, -1])
def test_gpu_int4_gemv_forms_real_sizes(form, group, monkeypatch):
    # each int4 form of the one-row GEMV forced, bf16 at a real size (BIASED_PLANES: its inline PTX)
    from fusecc.kernels import quant_gemv

    kernel = quant_gemv._weight_only_gemv
    force_int4_form(monkeypatch, kernel, form)
    N, K = 6144, 4096
    qweight, scales, z, w64 = _fast_int4(N, K, K if group == -1 else group)
    x = torch.randn(1, K, device="cuda").bfloat16()
    out = weight_only_matmul(x, qweight.cuda(), scales.cuda(), z.cuda(), 4, group, path="gemv")
    ref = x.double() @ w64.cuda().t()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())


def force_int4_form(monkeypatch, kernel, form: str) -> None:
    """Leave `kernel` only its configs of one int4 tile form (int_unpack's constant named `form`):
    autotuning would run only the fastest, the interpreter only the first."""
    from fusecc.kernels import int_unpack, launch

    mode = getattr(int_unpack, form)
    monkeypatch.setattr(kernel, "configs", [c for c in kernel.configs if c.kwargs["PLANES"] == mode])
    monkeypatch.setattr(launch, "_FITTING_CONFIG", {})


def _fast_int4(N, K, group):
    # the nibble-by-nibble packer is too slow at 4096^2: pack with shifts (same layout)
    q = torch.randint(0, 16, (N, K))
    words = (q.view(N, K // 8, 8).long() << torch.arange(0, 32, 4)).sum(-1)
    qweight = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    scales = torch.rand(N, K // group) * 0.05 + 0.01
    z = torch.randint(0, 16, (N, K // group)).float()
    g = torch.arange(K) // group
    return qweight, scales, z, (q.double() - z.double()[:, g]) * scales.double()[:, g]
