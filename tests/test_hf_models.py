"""Acceptance: transformers decoder models compiled with backend="fusecc" match eager logits.

Each family runs in a fresh subprocess that never imports fusecc: the backend must be found
through the `torch_dynamo_backends` entry point. The subprocess is this file run as a script
(`python tests/test_hf_models.py FAMILY [--freeze]`); it loops over its two variants (dynamic
None/True, each under one of no_grad/inference_mode; frozen and unfrozen runs take the opposite
pairs) x two (batch, seq) shapes, compares each with eager at rtol=atol=1e-5 and prints one JSON
line that the test parses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
SHAPES = ((2, 7), (3, 12))  # (batch, seq): both differ between the two calls (no size 1: Dynamo specializes it)
TOL = 1e-5


# ----------------------------------------------------------------------------- subprocess side

def build_model(family: str):
    import torch
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if family == "llama":
        config = tf.LlamaConfig(num_key_value_heads=2, **common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(num_key_value_heads=2, **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "mistral":
        # A sliding window shorter than the longer sequence exercises the windowed mask.
        config = tf.MistralConfig(num_key_value_heads=1, sliding_window=4, **common)
        cls = tf.MistralForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(config).to(torch.float32).eval()
    # Random init leaves some parameters at exact 0/1 (norm weights, biases): perturb them so
    # that a pass that wrongly treats a weight as a constant 1 or 0 cannot pass by accident.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def run_family(family: str, freeze: bool) -> dict:
    import torch

    assert "fusecc" not in sys.modules, "the test subprocess must not import fusecc"
    model = build_model(family)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, vocab, shape, generator=generator) for shape in SHAPES]
    with torch.no_grad():
        expected = [model(ids).logits for ids in inputs]

    contexts = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    # (dynamic, grad context): the two tests together cover the four combinations, each once
    # (compiling every combination in both took a sixth of the CPU suite's time)
    variants = [(None, "inference_mode"), (True, "no_grad")]
    if not freeze:
        variants = [(None, "no_grad"), (True, "inference_mode")]
    with tempfile.TemporaryDirectory(prefix=f"fusecc-hf-{family}-") as dump_root:
        results = _run_variants(model, variants, contexts, inputs, expected, dump_root, freeze)
    return {"family": family, "freeze": freeze, "fusecc_loaded_by_backend": "fusecc" in sys.modules,
            "results": results}


def _run_variants(model, variants, contexts, inputs, expected, dump_root, freeze) -> list:
    import torch

    results = []
    for index, (dynamic, ctx_name) in enumerate(variants):
        torch._dynamo.reset()
        dump_dir = os.path.join(dump_root, f"v{index}")
        if dynamic is None and not freeze:
            # Exactly what a user writes; dumping through the environment, default (non-strict)
            # options, so a silent fallback to eager shows up as a warning we fail on below.
            os.environ["FUSECC_DUMP_DIR"] = dump_dir
            kwargs = {}
        else:
            os.environ.pop("FUSECC_DUMP_DIR", None)
            kwargs = {"dynamic": dynamic, "options": {"strict": True, "dump_dir": dump_dir, "freeze": freeze}}
        if index == 0:
            assert "fusecc" not in sys.modules, "fusecc was imported before torch.compile"
        compiled = torch.compile(model, backend="fusecc", **kwargs)
        for ids, want in zip(inputs, expected):
            with contexts[ctx_name](), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = compiled(ids).logits
            fusecc_warnings = [str(w.message) for w in caught if "fusecc" in str(w.message)]
            assert not fusecc_warnings, fusecc_warnings
            err = (got - want).abs().max().item()
            ok = bool(torch.allclose(got, want, rtol=TOL, atol=TOL)) and got.shape == want.shape
            results.append({"dynamic": dynamic, "ctx": ctx_name, "shape": list(ids.shape),
                            "ok": ok, "max_abs_err": err})
        reports = sorted(Path(dump_dir).glob("*/report.json"))
        frozen = sum(json.loads(p.read_text())["num_frozen"] for p in reports)
        results[-1]["graphs"] = len(reports)
        results[-1]["frozen"] = frozen
    return results


# ----------------------------------------------------------------------------- pytest side

def _run_subprocess(family: str, freeze: bool) -> dict:
    # A plain CPU user's environment: no FUSECC_* settings and no TRITON_INTERPRET (which
    # conftest sets for kernel tests; with it the backend would run generated Triton kernels
    # through the slow interpreter, which the codegen tests cover).
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSECC_") and k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(Path(__file__).resolve()), family] + (["--freeze"] if freeze else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def _check(summary: dict, freeze: bool) -> None:
    # The backend was resolved through the entry point (fusecc got imported by torch, not by us).
    assert summary["fusecc_loaded_by_backend"]
    bad = [r for r in summary["results"] if not r["ok"]]
    assert not bad, f"logits differ from eager: {bad}"
    # Every variant really compiled with fusecc: at least one graph report per variant.
    per_variant = [r for r in summary["results"] if "graphs" in r]
    assert per_variant and all(r["graphs"] >= 1 for r in per_variant), summary
    # dynamic=True: one symbolic-shape graph serves both shapes (no recompilation).
    assert all(r["graphs"] == 1 for r in per_variant if r["dynamic"] is True), summary
    if freeze:
        assert all(r["frozen"] > 0 for r in per_variant), summary
    else:
        assert all(r["frozen"] == 0 for r in per_variant), summary


if __name__ != "__main__":
    import pytest

    @pytest.mark.slow
    @pytest.mark.parametrize("family", FAMILIES)
    def test_family_matches_eager(family):
        summary = _run_subprocess(family, freeze=False)
        _check(summary, freeze=False)
        # 2 (dynamic, grad context) variants x 2 shapes
        assert len(summary["results"]) == 4

    @pytest.mark.slow
    @pytest.mark.parametrize("family", FAMILIES)
    def test_family_matches_eager_frozen(family):
        summary = _run_subprocess(family, freeze=True)
        _check(summary, freeze=True)
        assert len(summary["results"]) == 4


if __name__ == "__main__":
    family = sys.argv[1]
    print(json.dumps(run_family(family, freeze="--freeze" in sys.argv[2:])))
