"""Perplexity of a model on token windows, through fusecc's engine and through transformers eager.

    from fusecc import LLM
    llm = LLM("model-dir-or.gguf", dtype="float32", device="cpu")      # any LLM kwargs: quantization=...
    windows = token_windows(llm.get_tokenizer(), window_len=512, max_windows=16)   # fusecc/eval/docstring_corpus.py
    ours = engine_perplexity(llm, windows)                  # LLM.generate(prompt_logprobs=0, max_tokens=1)
    ref = transformers_perplexity(load_transformers_model("model-dir-or.gguf", torch.float32, "cpu"), windows)
    relative_difference(ours, ref)                          # ours.perplexity / ref.perplexity - 1

Both score the same tokens: in each window, tokens 1..n-1 given those before them (the window's
first token has no context). A window's NLL is the sum of -log p(token) in nats; the overall
perplexity is exp(sum of NLLs / number of scored tokens). The engine side takes whatever LLM the
caller built (a quantized one, a KV-cache dtype, speculative decoding): the measurement is the
prompt logprobs the engine returns, so it sees exactly what serving computes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from fusecc.runtime.sampling_params import SamplingParams


@dataclass
class Perplexity:
    nll: list[float] = field(default_factory=list)  # per window: sum of -log p over its scored tokens (nats)
    num_tokens: list[int] = field(default_factory=list)  # per window: tokens scored (its length - 1)
    seconds: float = 0.0  # wall time of the scoring (not of loading the model)

    @property
    def total_nll(self) -> float:
        return math.fsum(self.nll)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def mean_nll(self) -> float:
        return self.total_nll / self.total_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "tokens": self.total_tokens,
                "windows": len(self.nll), "seconds": round(self.seconds, 3), "nll_per_window": self.nll}


def engine_perplexity(llm, windows: list[list[int]]) -> Perplexity:
    """Perplexity through fusecc's engine: each window is a prompt whose prompt logprobs (k = 0:
    the prompt token's only) are asked for, with one generated token that is not scored.
    llm: a fusecc.LLM whose max_model_len exceeds the window length."""
    _check_windows(windows)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    result = Perplexity(seconds=seconds)
    for w, out in zip(windows, outs):
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(w), (len(w), None if plp is None else len(plp))
        result.nll.append(-math.fsum(plp[i][w[i]].logprob for i in range(1, len(w))))
        result.num_tokens.append(len(w) - 1)
    return result


def transformers_perplexity(hf_model, windows: list[list[int]]) -> Perplexity:
    """Perplexity through transformers' own forward (no compilation), one window at a time, on the
    model's device and in its dtype; log_softmax of its logits in float32."""
    _check_windows(windows)
    device = next(hf_model.parameters()).device
    result = Perplexity()
    start = time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w], device=device)
            logits = hf_model(ids).logits[0, :-1].float()  # [n - 1, vocab]: position i predicts token i + 1
            token_lp = logits.log_softmax(dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
            result.nll.append(-token_lp.double().sum().item())
            result.num_tokens.append(len(w) - 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - start
    return result


def load_transformers_model(model: str, dtype: torch.dtype, device: str | torch.device):
    """AutoModelForCausalLM of a checkpoint folder or a GGUF file (or a folder holding one:
    transformers dequantizes it, as fusecc does), in `dtype` on `device`, in eval mode."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from fusecc.runtime.gguf import gguf_file

    path = gguf_file(model)
    if path is not None:
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                  local_files_only=True)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(Path(model)), dtype=dtype, local_files_only=True)
    return hf.to(device).eval()


def relative_difference(ours: Perplexity, reference: Perplexity) -> float:
    """ours.perplexity / reference.perplexity - 1 (signed: > 0 means ours is worse)."""
    if ours.num_tokens != reference.num_tokens:
        raise ValueError("the two measurements scored different windows")
    return ours.perplexity / reference.perplexity - 1.0


def _check_windows(windows: list[list[int]]) -> None:
    if not windows or any(len(w) < 2 for w in windows):
        raise ValueError("perplexity needs at least one window of at least 2 tokens")
