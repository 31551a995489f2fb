"""Tests for fusecc/passes/attention_matching.py: `fusecc::sdpa` and the eager attention pattern
(with HF's repeat_kv) become `fusecc::flash_attention` when provably equivalent; everything else
stays, with the reason recorded. Expected values come from eager PyTorch (SDPA / the eager graph);
on CPU the custom op runs its torch reference, and one test swaps in the Triton kernel (interpreter).
"""

import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fusecc.ops  # noqa: F401
from fusecc.backend import fusecc_backend  # the callable: works without the installed entry point
from fusecc.kernels import flash_attention as triton_flash_attention
from fusecc.passes.attention_matching import AttentionMatching
from graph_builders import code, count, freeze_input, op_counts, run_pass, trace

try:
    from expecttest import TestCase
except ImportError:  # the GPU machine has no expecttest: the graph tests are CPU checks, skipped there
    import unittest

    @unittest.skip("needs expecttest")
    class TestCase(unittest.TestCase):
        pass

aten = torch.ops.aten
flash = torch.ops.fusecc.flash_attention.default
sdpa = torch.ops.fusecc.sdpa


def repeat_kv(x, n_rep):
    """transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D] through an expand + copy."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention(q, k, v, mask):
    """transformers' eager_attention_forward (dropout off, scaling 0.25, 2 query heads per kv head)."""
    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def qkv(B=2, Hq=4, Hkv=2, Sq=7, Sk=7, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as HF makes it: a [B, S, H, D] projection viewed as [B, H, S, D]
    q = torch.randn(B, Sq, Hq, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    return q, k, v


def causal_bool(B, Sq, Sk):
    return torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)[None, None].expand(B, 1, Sq, Sk)


def finfo_mask(B, Sq, Sk, dtype=torch.float32):
    return torch.where(causal_bool(B, Sq, Sk), 0.0, torch.finfo(dtype).min).to(dtype)


def finfo_masked_attention(q, k, v, keep):
    """eager_attention under HF's mask built in the graph: 0 where kept, finfo(dtype).min elsewhere."""
    mask = torch.where(keep, torch.tensor(0.0, dtype=q.dtype), torch.finfo(q.dtype).min)
    return eager_attention(q, k, v, mask)


def keep_with_empty_row():
    """A causal keep-mask [2, 1, 7, 7] whose row 3 of batch 0 sees no key."""
    keep = causal_bool(2, 7, 7).clone()
    keep[0, 0, 3] = False
    return keep


class TestAttentionMatching(TestCase):
    def match(self, fn, *inputs, frozen=None, rewritten=1, atol=1e-5):
        """Trace, optionally freeze input `frozen` as a constant, run the pass, check values."""
        gm = trace(fn, *inputs)
        if frozen is not None:
            freeze_input(gm, frozen, inputs[frozen])
        graph_pass = AttentionMatching()
        result, text = run_pass(graph_pass, gm)
        self.assertEqual(result.modified, rewritten > 0)
        self.assertEqual(result.stats["rewritten"], rewritten)
        self.assertEqual(count(gm, flash), rewritten)
        for node in gm.graph.nodes:
            if node.op == "call_function":
                self.assertIn("val", node.meta)
        if rewritten:
            torch.testing.assert_close(gm(*inputs), fn(*inputs), atol=atol, rtol=atol)
        return result, text, gm, graph_pass.reasons

    def assert_kept(self, fn, *inputs, reason, frozen=None):
        result, text, gm, reasons = self.match(fn, *inputs, frozen=frozen, rewritten=0)
        self.assertEqual(dict(result.stats), {f"skipped:{reason}": 1})
        self.assertEqual(list(reasons.values()), [reason])
        return gm

    # ---------------------------------------------------------------- fusecc::sdpa

    def test_sdpa_repeat_kv_bool_mask(self):
        # The HF "sdpa" graph: repeat_kv copies of K/V and an expanded boolean causal mask.
        def fn(q, k, v, m):
            return sdpa(q, repeat_kv(k, 2), repeat_kv(v, 2), m, False, 0.25)

        q, k, v = qkv()
        result, text, gm, _ = self.match(fn, q, k, v, causal_bool(2, 7, 7))
        self.assertEqual(dict(result.stats), {"rewritten": 1, "rewritten:sdpa": 1, "repeat_kv_removed": 1})
        self.assertEqual(op_counts(gm), {"fusecc.flash_attention": 1})  # no expand, no clone left
        self.assertExpectedInline(text, """\
def forward(self, q_1, k_1, v_1, m_1):
    flash_attention_default = torch.ops.fusecc.flash_attention.default(q_1, k_1, v_1, False, 0.25, m_1);  q_1 = k_1 = v_1 = m_1 = None
    return flash_attention_default""")

    def test_sdpa_through_triton_kernel(self):
        # The same rewritten graph with the Triton kernel (interpreter on CPU) in place of the
        # reference: equal to SDPA too.
        def fn(q, k, v, m):
            return sdpa(q, repeat_kv(k, 2), repeat_kv(v, 2), m, False, None)

        q, k, v = qkv(Sq=9, Sk=9, D=16, seed=1)
        m = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(2)) > 0.4
        m[0, 0, 3] = False  # a fully masked row: SDPA gives 0 there, so must we
        gm = trace(fn, q, k, v, m)
        AttentionMatching().run(gm)
        node = next(n for n in gm.graph.nodes if n.target is flash)
        qn, kn, vn, causal, scale, mn = node.args
        env = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], (q, k, v, m)))
        out = triton_flash_attention(env[qn], env[kn], env[vn], causal=causal, scale=scale, attn_mask=env[mn])
        expected = fn(q, k, v, m)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        self.assertTrue(torch.equal(expected[0, :, 3], torch.zeros_like(expected[0, :, 3])))

    def test_sdpa_enable_gqa_float_mask(self):
        def fn(q, k, v, m):
            return sdpa(q, k, v, m, False, None, True)

        q, k, v = qkv(Hq=4, Hkv=1, Sq=5, Sk=11)
        m = torch.randn(5, 11).masked_fill(torch.rand(5, 11) > 0.7, float("-inf"))
        result, text, gm, _ = self.match(fn, q, k, v, m)
        self.assertEqual(dict(result.stats), {"rewritten": 1, "rewritten:sdpa": 1})
        self.assertExpectedInline(text, """\
def forward(self, q_1, k_1, v_1, m_1):
    flash_attention_default = torch.ops.fusecc.flash_attention.default(q_1, k_1, v_1, False, None, m_1);  q_1 = k_1 = v_1 = m_1 = None
    return flash_attention_default""")

    def test_sdpa_causal_equal_lengths(self):
        # top-left (SDPA) and bottom-right (kernel) causal agree when seq_q == seq_k
        def fn(q, k, v):
            return sdpa(q, k, v, None, True, None)

        q, k, v = qkv(Hkv=4)
        result, text, gm, _ = self.match(fn, q, k, v)
        self.assertIn("flash_attention.default(q_1, k_1, v_1, True, None, None)", text)

    def test_sdpa_causal_different_lengths_kept(self):
        def fn(q, k, v):
            return sdpa(q, k, v, None, True, None)

        self.assert_kept(fn, *qkv(Hkv=4, Sq=3, Sk=7), reason="causal_top_left_seq_q_ne_seq_k")

    def test_sdpa_unsupported_head_dim_kept(self):
        def fn(q, k, v):
            return sdpa(q, k, v, None, False, None)

        self.assert_kept(fn, *qkv(Hkv=4, Sq=2, Sk=2, D=320), reason="head_dim_320_unsupported")
        # head_dim 0: an empty result in eager; the default scale 1/sqrt(0) is no scale at all
        gm = self.assert_kept(fn, *qkv(Hkv=4, Sq=2, Sk=2, D=0), reason="head_dim_0_unsupported")
        self.assertEqual(gm(*qkv(Hkv=4, Sq=2, Sk=2, D=0)).shape, (2, 4, 2, 0))

    def test_sdpa_mask_not_broadcastable_kept(self):
        def fn(q, k, v, m):
            return sdpa(q, k, v, m, False, None)

        gm = trace(fn, *qkv(Hkv=4), torch.ones(2, 3, 7, 7, dtype=torch.bool))  # 3 heads vs 4
        result = AttentionMatching().run(gm)
        self.assertEqual(dict(result.stats), {"skipped:mask_shape": 1})

    def test_sdpa_mask_dtype_kept(self):
        def fn(q, k, v, m):
            return sdpa(q, k, v, m, False, None)

        gm = trace(fn, *qkv(Hkv=4), torch.zeros(7, 7, dtype=torch.float64))
        self.assertEqual(dict(AttentionMatching().run(gm).stats), {"skipped:mask_dtype": 1})

    def test_sdpa_source_written_after_copy_kept(self):
        # repeat_kv copied k before k changed in place: reading k at the attention would see the new value.
        def fn(q, k, v):
            kr, vr = repeat_kv(k, 2), repeat_kv(v, 2)
            k.add_(1.0)
            return sdpa(q, kr, vr, None, False, None)

        q, k, v = qkv()
        gm = trace(fn, q, k.clone(), v)
        result = AttentionMatching().run(gm)
        self.assertEqual(dict(result.stats), {"skipped:source_written_before_use": 1})
        self.assertEqual(count(gm, aten.add_.Tensor), 1)
        torch.testing.assert_close(gm(q, k.clone(), v), fn(q, k.clone(), v))

    # ---------------------------------------------------------------- the eager pattern

    def test_eager_pattern_constant_mask(self):
        # HF "eager": matmul -> * scale -> + finfo.min mask -> softmax(fp32) -> matmul, with repeat_kv.
        q, k, v = qkv()
        result, text, gm, _ = self.match(eager_attention, q, k, v, finfo_mask(2, 7, 7), frozen=3)
        self.assertEqual(dict(result.stats), {"rewritten": 1, "rewritten:eager": 1, "repeat_kv_removed": 1})
        self.assertEqual(op_counts(gm), {"fusecc.flash_attention": 1})
        self.assertExpectedInline(text, """\
def forward(self, q_1, k_1, v_1, mask_1):
    _frozen_param0 = self._frozen_param0
    flash_attention_default = torch.ops.fusecc.flash_attention.default(q_1, k_1, v_1, False, 0.25, _frozen_param0);  q_1 = k_1 = v_1 = _frozen_param0 = None
    return flash_attention_default""")

    def test_eager_pattern_mask_built_in_graph_bf16(self):
        # where(keep, 0, finfo.min) computed in the graph is provably finite, and bf16's min is huge:
        # a fully masked row rounds to one value in eager's bf16 and in the kernel's fp32 alike
        q, k, v = qkv(dtype=torch.bfloat16)
        result, text, gm, _ = self.match(finfo_masked_attention, q, k, v, keep_with_empty_row(), atol=2e-2)
        self.assertEqual(result.stats["rewritten:eager"], 1)

    def test_eager_fp16_finfo_min_mask_kept(self):
        # fp16's min (-65504) is no longer huge: eager's fp16 logits + mask round to steps of 32, so a
        # fully masked row becomes uniform in eager, while the kernel's fp32 keeps its logits apart
        q, k, v = qkv(dtype=torch.float16)
        keep, fn = keep_with_empty_row(), finfo_masked_attention
        out = fn(q, k, v, keep)
        uniform = repeat_kv(v, 2)[0, 0].float().mean(0)
        torch.testing.assert_close(out[0, 0, 3].float(), uniform, atol=2e-3, rtol=2e-3)  # eager's artefact
        self.assert_kept(fn, q, k, v, keep, reason="eager_half_mask_rounds_rows")

    def test_eager_mask_overflowing_its_dtype_kept(self):
        # bf16's min cast to fp16, and an int -100000 cast to fp16, are -inf: eager's fully masked
        # row is NaN, the kernel's 0
        keep = causal_bool(1, 4, 4).clone()
        keep[0, 0, 2] = False

        def from_bf16(q, k, v, keep):
            mask = torch.where(keep, torch.tensor(0.0, dtype=torch.bfloat16), torch.finfo(torch.bfloat16).min)
            return eager_attention(q, k, v, mask.to(torch.float16))

        def from_int(q, k, v, keep):
            return eager_attention(q, k, v, torch.where(keep, 0, -100000).to(torch.float16))

        q, k, v = qkv(B=1, Sq=4, Sk=4, dtype=torch.float16)
        for fn in (from_bf16, from_int):
            self.assertTrue(fn(q, k, v, keep)[0, :, 2].isnan().all())
            self.assert_kept(fn, q, k, v, keep, reason="eager_mask_may_hold_-inf")

    def test_eager_probabilities_rounded_to_a_narrower_dtype_kept(self):
        # fp32 attention whose probabilities go through bf16: rounding the fp32 kernel would not do
        def fn(q, k, v):
            p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
            return p.to(torch.bfloat16).float() @ v

        self.assert_kept(fn, *qkv(Hkv=4), reason="eager_probabilities_rounded")

    def test_eager_pattern_no_mask_div_scale(self):
        def fn(q, k, v):
            w = torch.matmul(q, k.transpose(-1, -2)) / 4.0
            return torch.matmul(w.softmax(-1), v)

        result, text, gm, _ = self.match(fn, *qkv(Hkv=4, Sq=5, Sk=9))
        self.assertIn("flash_attention.default(q_1, k_1, v_1, False, 0.25, None)", text)

    def test_eager_pattern_tensor_scale_goes_to_q(self):
        # Dynamo lifts `self.scaling` to a 0-d graph input under dynamic shapes: q is scaled instead.
        def fn(q, k, v, scale):
            w = torch.matmul(q, k.transpose(2, 3)) * scale
            return torch.matmul(F.softmax(w, dim=-1), v)

        result, text, gm, _ = self.match(fn, *qkv(Hkv=4), torch.tensor(0.3))
        self.assertExpectedInline(text, """\
def forward(self, q_1, k_1, v_1, scale_1):
    mul_tensor = torch.ops.aten.mul.Tensor(q_1, scale_1);  q_1 = scale_1 = None
    flash_attention_default = torch.ops.fusecc.flash_attention.default(mul_tensor, k_1, v_1, False, 1.0, None);  mul_tensor = k_1 = v_1 = None
    return flash_attention_default""")

    def test_eager_mask_input_may_hold_inf_kept(self):
        # eager softmax of an all -inf row is NaN, the kernel's 0: a mask input is not provably finite.
        q, k, v = qkv()
        m = finfo_mask(2, 7, 7).masked_fill(~causal_bool(2, 7, 7), float("-inf")).clone()
        m[0, 0, 2] = float("-inf")
        self.assertTrue(eager_attention(q, k, v, m)[0, :, 2].isnan().all())
        self.assert_kept(eager_attention, q, k, v, m, reason="eager_mask_may_hold_-inf")

    def test_eager_dropout_kept(self):
        def fn(q, k, v):
            w = F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=-1)
            return torch.matmul(F.dropout(w, p=0.1, training=True), v)

        gm = trace(fn, *qkv(Hkv=4))
        result = AttentionMatching().run(gm)
        self.assertFalse(result.modified)
        self.assertEqual(count(gm, flash), 0)

    def test_eager_weights_returned_kept(self):
        # output_attentions: the probabilities are a graph output, so the eager computation stays.
        def fn(q, k, v):
            w = F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=-1)
            return torch.matmul(w, v), w

        self.assert_kept(fn, *qkv(Hkv=4), reason="eager_intermediate_used_elsewhere")


# ---------------------------------------------------------------- end to end: transformers Llama

def _llama(attn_implementation):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hf_llama_runs_flash_attention(attn_implementation, tmp_path):
    pytest.importorskip("transformers")
    torch._dynamo.reset()
    model = _llama(attn_implementation)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend=fusecc_backend, options={"dump_dir": str(tmp_path), "strict": True})
        actual = compiled(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    (folder,) = glob.glob(os.path.join(tmp_path, "*"))
    (final,) = glob.glob(os.path.join(folder, "*.final.py"))
    text = open(final).read()
    assert text.count("torch.ops.fusecc.flash_attention.default(") == 2  # one per layer
    assert "fusecc.sdpa" not in text
    assert "aten.clone.default(expand" not in text  # repeat_kv's copies are gone
    assert "aten.amax" not in text and "aten.bmm.default(view" not in text.split("flash_attention")[-1]
    report = json.load(open(os.path.join(folder, "report.json")))
    (stats,) = [p["stats"] for p in report["passes"] if p["name"] == "attention_matching"]
    assert stats == {"rewritten": 2, f"rewritten:{attn_implementation}": 2, "repeat_kv_removed": 2}


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gpu_hf_llama_bf16(attn_implementation, tmp_path):
    import transformers as tf

    torch._dynamo.reset()
    config = tf.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (2, 256), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits.float()
        compiled = torch.compile(model, backend=fusecc_backend, options={"dump_dir": str(tmp_path), "strict": True})
        actual = compiled(ids).logits.float()
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert rel < 1e-2, rel
    (final,) = glob.glob(os.path.join(tmp_path, "*", "*.final.py"))
    text = open(final).read()
    assert text.count("torch.ops.fusecc.flash_attention.default(") == 4 and "fusecc.sdpa" not in text


# ---- patterns that look like attention but are not the kernel's math (found by a hunt) ----

def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend=fusecc_backend, options={"codegen": "aten", "strict": True})


def _eager_softmax(x):
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def test_unscaled_eager_attention_keeps_scale_one():
    # no mul/div on the logits: eager scales by 1, the kernel's default would be 1/sqrt(D)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    fn = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v  # noqa: E731
    torch.testing.assert_close(_compiled(fn)(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)


def test_bool_mask_added_to_logits_is_not_a_keep_mask():
    # logits + bool adds 1.0 where True; it must not become a keep/drop mask
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))

    def fn(q, k, v):
        m = torch.ones(8, 8, dtype=torch.bool).tril()
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m, dim=-1) @ v

    torch.testing.assert_close(_compiled(fn)(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bfloat16])
def test_logits_rounded_before_softmax_stay_rounded(dtype):
    # a cast of the logits to an integer, or narrowing to bf16, changes them before the softmax
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) * 3 for _ in range(3))
    fn = lambda q, k, v: _eager_softmax((q @ k.transpose(-1, -2) * 0.25).to(dtype)).float() @ v  # noqa: E731
    torch.testing.assert_close(_compiled(fn)(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)
