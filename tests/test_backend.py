"""The torch.compile entry point: autograd graphs, graph breaks and unsupported ops, fallback
on capture errors, SDPA kept whole, in-place cache updates and freezing."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

import fusecc.backend


pytestmark = pytest.mark.usefixtures("plain_cpu_user")


def reports(dump_dir) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(dump_dir).glob("graph_*/report.json"))]


def fusecc_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "fusecc" in str(w.message)]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)) * 1.0)


# ---- autograd ---------------------------------------------------------------------------------


def test_autograd_graph_runs_unoptimized_with_warning_and_correct_grads(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fusecc", options={"dump_dir": str(tmp_path)})
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="needs autograd"):
        out = compiled(x)
    expected = ref(x)
    torch.testing.assert_close(out, expected)
    assert out.requires_grad
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad)
    (report,) = reports(tmp_path)
    assert report["status"] == "unoptimized"


def test_same_model_compiles_under_no_grad(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend="fusecc", options={"dump_dir": str(tmp_path), "strict": True})
    x = torch.randn(3, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
        expected = model(x)
    assert not fusecc_warnings(caught)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (report,) = reports(tmp_path)
    assert report["status"] == "compiled" and report["ops_final"] > 0


# ---- graph breaks and ops fusecc does not know -----------------------------------------------


def run_both(fn, *args, **compile_kwargs):
    """Compile with fusecc (non-strict: never crash), call, compare with eager."""
    compiled = torch.compile(fn, backend="fusecc", **compile_kwargs)
    with torch.no_grad():
        expected = fn(*args)
        actual = compiled(*args)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    return actual


def test_graph_break_on_data_dependent_op():
    def fn(x):
        idx = torch.nonzero(x > 0)  # data-dependent output shape: Dynamo breaks the graph here
        return (x.sin() * 2, idx.float().sum() + x.sum())

    run_both(fn, torch.randn(12))


def test_data_dependent_ops_captured_in_graph():
    # Dynamo puts nonzero/item into the graph (unbacked SymInts); whatever fusecc does, no crash.
    def fn(x):
        n = (x > 0).sum().item()
        return x[x > 0] * 2, torch.nonzero(x).shape[0] + x * n

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        run_both(fn, torch.randn(10))


def test_explicit_graph_break_and_disabled_function():
    @torch._dynamo.disable
    def opaque(x):
        return x.numpy().sum()  # not traceable

    def fn(x):
        y = x.cos()
        print("", end="")  # graph break
        return y * float(opaque(y)) + x

    run_both(fn, torch.randn(4, 4))


def test_ops_without_decomposition():
    # Kept as ATen ops: FFT, sort/topk, linear algebra, scatter/gather, cumulative ops.
    def fn(x, idx):
        spec = torch.fft.rfft(x, dim=-1).abs()
        vals, ind = torch.topk(x, 3, dim=-1)
        q, r = torch.linalg.qr(x[:, :4, :4])
        g = torch.gather(x, 1, idx)
        return spec, vals, ind, r.abs(), g.cumsum(-1), torch.searchsorted(x.sort(-1).values[:, :3], g)

    x = torch.randn(2, 5, 8)
    idx = torch.randint(0, 5, (2, 3, 8))
    run_both(fn, x, idx, options={"strict": True})


def test_custom_op_capture_does_not_know():
    @torch.library.custom_op("fusecc_test::scaled_cumsum", mutates_args=())
    def scaled_cumsum(x: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.cumsum(x, -1) * scale

    @scaled_cumsum.register_fake
    def _(x, scale):
        return torch.empty_like(x)

    def fn(x):
        return torch.ops.fusecc_test.scaled_cumsum(x * 1, 0.5) + 0

    run_both(fn, torch.randn(3, 7), options={"strict": True})


def test_custom_op_that_mutates_its_input():
    # Captured as auto_functionalized + copy_ back into the input; the write must not be dropped.
    @torch.library.custom_op("fusecc_test::write_scaled", mutates_args=("out",))
    def write_scaled(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(x * 3)

    @write_scaled.register_fake
    def _(x, out):
        return None

    def fn(x, out):
        torch.ops.fusecc_test.write_scaled(x.relu(), out)
        return out + 1

    compiled = torch.compile(fn, backend="fusecc", options={"strict": True})
    x = torch.randn(2, 6)
    out, out_ref = torch.zeros(2, 6), torch.zeros(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, out), fn(x, out_ref))
    torch.testing.assert_close(out, out_ref)
    assert out.abs().sum() > 0


def test_dynamic_float_scalar_is_compiled_not_dropped(tmp_path):
    """Dynamo may restart analysis from inside the backend (it re-traces to specialize a float);
    fusecc must let that through, not treat it as a failure and fall back for good."""

    def fn(x, s):
        return x * s + s

    compiled = torch.compile(fn, backend="fusecc", dynamic=True, options={"dump_dir": str(tmp_path)})
    x = torch.randn(6)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in (2.5, 3.5):
            torch.testing.assert_close(compiled(x, s), fn(x, s))
    assert not fusecc_warnings(caught)
    assert reports(tmp_path) and all(r["status"] == "compiled" for r in reports(tmp_path))
    # A restarted trace leaves no half-written folder behind.
    assert all((p / "report.json").exists() for p in tmp_path.iterdir())


# ---- fallback on capture errors ---------------------------------------------------------------


def _broken_capture(*args, **kwargs):
    raise RuntimeError("simulated capture failure")


def test_capture_error_falls_back_with_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(fusecc.backend, "capture_aten", _broken_capture)
    model = MLP()
    compiled = torch.compile(model, backend="fusecc", options={"dump_dir": str(tmp_path)})
    x = torch.randn(2, 8)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="simulated capture failure"):
            out = compiled(x)
        torch.testing.assert_close(out, model(x))
    (report,) = reports(tmp_path)
    assert report["status"] == "unoptimized"
    assert any("simulated capture failure" in n for n in report["notes"])
    assert list((tmp_path / "graph_000").glob("*.error.txt"))


def test_pass_error_falls_back_with_warning(monkeypatch):
    def broken_passes(*args, **kwargs):
        raise ValueError("simulated pass failure")

    monkeypatch.setattr(fusecc.backend, "run_passes", broken_passes)
    with pytest.warns(UserWarning, match="simulated pass failure"):
        run_both(lambda x: x.exp() + 1, torch.randn(5))


def test_strict_raises(monkeypatch):
    monkeypatch.setattr(fusecc.backend, "capture_aten", _broken_capture)
    compiled = torch.compile(lambda x: x + 1, backend="fusecc", options={"strict": True})
    with torch.no_grad(), pytest.raises(Exception, match="simulated capture failure"):
        compiled(torch.randn(3))


# ---- SDPA -------------------------------------------------------------------------------------


def attention(q, k, v, mask):
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    c = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
    return a + b + c


def test_sdpa_kept_whole(tmp_path):
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.randn(6, 6) > 0
    mask[:, 0] = True
    run_both(attention, q, k, v, mask, options={"strict": True, "dump_dir": str(tmp_path)})
    aten = (tmp_path / "graph_000" / "01.aten.py").read_text()
    final = next((tmp_path / "graph_000").glob("*.final.py")).read_text()
    assert aten.count("torch.ops.fusecc.sdpa.default(") == 3
    # Later passes may turn fusecc.sdpa into a fusecc attention kernel; it never gets lowered.
    assert final.count("torch.ops.fusecc.sdpa.default(") + final.count("torch.ops.fusecc.flash_attention.") == 3
    for text in (aten, final):
        assert "aten._scaled_dot_product" not in text  # not lowered to a backend-specific kernel op
        assert "aten._softmax" not in text and "aten.bmm" not in text
    (report,) = reports(tmp_path)
    assert report["num_sdpa_kept_whole"] == 3


def test_sdpa_dynamic_shapes():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(fn, backend="fusecc", dynamic=True, options={"strict": True})
    with torch.no_grad():
        for s in (5, 9):
            q, k, v = (torch.randn(2, 2, s, 8) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_sdpa_with_dropout_is_not_rewritten(tmp_path):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    compiled = torch.compile(fn, backend="fusecc", options={"strict": True, "dump_dir": str(tmp_path)})
    with torch.no_grad():
        out = compiled(q, k, v)
    no_dropout = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == no_dropout.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, no_dropout)  # dropout really happened
    aten = (tmp_path / "graph_000" / "01.aten.py").read_text()
    final = next((tmp_path / "graph_000").glob("*.final.py")).read_text()
    assert "fusecc.sdpa" not in aten and "torch.ops.fusecc" not in final
    (report,) = reports(tmp_path)
    assert report["num_sdpa_kept_whole"] == 0


# ---- in-place cache updates and freezing -----------------------------------------------------


class CacheStep(nn.Module):
    """One decode step against a static KV cache held in buffers, updated in place."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("k_cache", torch.zeros(2, 1, 16, 8))
        self.register_buffer("v_cache", torch.zeros(2, 1, 16, 8))

    def forward(self, x, pos):
        # x: [2, 1, T, 8], pos: [T]
        k = self.proj(x)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache[:, :, pos] = x
        return F.scaled_dot_product_attention(k, self.k_cache, self.v_cache)


@pytest.mark.parametrize("freeze", [False, True])
def test_kv_cache_buffers_updated_in_place_across_calls(tmp_path, freeze):
    torch.manual_seed(0)
    model = CacheStep().eval()
    ref = copy.deepcopy(model)
    k_storage = model.k_cache.data_ptr()
    compiled = torch.compile(model, backend="fusecc",
                             options={"strict": True, "freeze": freeze, "dump_dir": str(tmp_path)})
    with torch.inference_mode():
        for step in range(5):
            x = torch.randn(2, 1, 1, 8)
            pos = torch.tensor([step])
            torch.testing.assert_close(compiled(x, pos), ref(x, pos), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.k_cache, ref.k_cache, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.v_cache, ref.v_cache, rtol=1e-5, atol=1e-5)
    assert model.k_cache.data_ptr() == k_storage  # updated in place, not replaced
    assert model.k_cache[:, :, :5].abs().sum() > 0 and model.k_cache[:, :, 5:].abs().sum() == 0
    for report in reports(tmp_path):
        assert report["status"] == "compiled"
        if freeze:
            assert report["num_frozen"] == 2  # proj.weight and proj.bias, never the caches
            assert sum("mutated" in n for n in report["notes"]) == 2
        else:
            assert report["num_frozen"] == 0


def test_cache_passed_as_input_updated_in_place():
    def step(cache, x, pos):
        cache[:, pos] = x * 2
        return cache.sum(1)

    compiled = torch.compile(step, backend="fusecc", options={"strict": True})
    cache, cache_ref = torch.zeros(3, 10), torch.zeros(3, 10)
    with torch.no_grad():
        for pos in (0, 3, 7):
            x = torch.randn(3)
            torch.testing.assert_close(compiled(cache, x, pos), step(cache_ref, x, pos))
            torch.testing.assert_close(cache, cache_ref)


def test_freeze_results_match_and_weights_become_constants(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
    out = run_both(model, x, options={"strict": True, "freeze": True, "dump_dir": str(tmp_path)})
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (report,) = reports(tmp_path)
    assert report["num_frozen"] == 4
    final = next((tmp_path / "graph_000").glob("*.final.py")).read_text()
    assert "_frozen_param" in final or "_folded" in final


def test_frozen_graph_reused_by_another_instance_computes_with_that_instance(tmp_path):
    # Dynamo guards an inlined module's weights on their shapes, not their identity: a second MLP
    # reuses the graph compiled (and frozen) for the first. It used to return the first MLP's
    # result; now it runs unoptimized with a warning, or raises under strict
    torch.manual_seed(0)
    first, second = MLP().eval(), MLP().eval()
    x = torch.randn(4, 8)
    options = {"freeze": True, "dump_dir": str(tmp_path)}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(torch.compile(first, backend="fusecc", options=options)(x), first(x))
        assert fusecc_warnings(caught) == []
        torch.testing.assert_close(torch.compile(second, backend="fusecc", options=options)(x), second(x))
        assert len(reports(tmp_path)) == 1  # one graph: the second call reused it
        (message,) = fusecc_warnings(caught)
        assert "compiled with freeze=True for other weights" in message
        # the first instance still runs the frozen graph, without a warning
        torch.testing.assert_close(torch.compile(first, backend="fusecc", options=options)(x), first(x))
        assert len(fusecc_warnings(caught)) == 1
    torch._dynamo.reset()
    strict = {"freeze": True, "strict": True}
    with torch.no_grad():
        torch.compile(first, backend="fusecc", options=strict)(x)
        with pytest.raises(RuntimeError, match="compiled with freeze=True for other weights"):
            torch.compile(second, backend="fusecc", options=strict)(x)


def test_without_freeze_weight_changes_are_seen():
    model = MLP().eval()
    compiled = torch.compile(model, backend="fusecc", options={"strict": True})
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
        model.fc2.bias.add_(1.0)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


# ---- the autotune option reaches the attention kernels ----------------------------------------

_AUTOTUNE_SEEN: list[bool] = []


@torch.library.custom_op("fusecc_test::autotune_probe", mutates_args=())
def _autotune_probe(x: torch.Tensor) -> torch.Tensor:
    """Stands where an attention kernel launch would: records what launch_tuned would decide."""
    from fusecc.kernels.launch import autotune_enabled

    _AUTOTUNE_SEEN.append(autotune_enabled())
    return x + 1


@_autotune_probe.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize("codegen", ["aten", "triton"])
@pytest.mark.parametrize("autotune", [False, True])
def test_autotune_option_decides_inside_the_graph_only(monkeypatch, autotune, codegen):
    from fusecc.kernels.launch import autotune_enabled

    if codegen == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # generated kernels on CPU tensors
    # the environment says the opposite: inside the compiled graph the option wins
    monkeypatch.setenv("FUSECC_AUTOTUNE", "0" if autotune else "1")
    _AUTOTUNE_SEEN.clear()
    compiled = torch.compile(lambda x: torch.ops.fusecc_test.autotune_probe(x * 2) * 3, backend="fusecc",
                             options={"autotune": autotune, "codegen": codegen})
    with torch.no_grad():
        out = compiled(torch.ones(4))
    torch.testing.assert_close(out, torch.full((4,), 9.0))
    assert _AUTOTUNE_SEEN == [autotune]
    assert autotune_enabled() is (not autotune)  # outside the graph the environment decides again
