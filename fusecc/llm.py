"""The offline API:

    from fusecc import LLM, SamplingParams
    llm = LLM()                                   # embedded default model; or LLM("path/to/hf-dir", **engine_args)
    for out in llm.generate(["Hello", "Hi"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.outputs[0].text, out.outputs[0].finish_reason, out.metrics)
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Sequence

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.outputs import RequestOutput
from fusecc.runtime.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine.from_engine_args(model, **engine_args)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        # Only finished outputs are returned, so the engine need not build (or detokenize) the
        # partial ones every step.
        params = [dataclasses.replace(p, output_kind="final_only") for p in params]
        ids = []
        results: dict[str, RequestOutput] = {}
        bar = None
        try:
            # inside the try: a prompt rejected halfway through the batch takes the ones queued
            # before it out again, instead of leaving them to run in the next call
            for prompt, p in zip(prompts, params):
                request_id = str(self._next_id)
                self._next_id += 1
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
            if use_tqdm:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(prompts), desc="Generating", unit="req", dynamic_ncols=True)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]


def _is_token_ids(prompts) -> bool:
    """One prompt of token ids (a list or tuple of integers, or a 1-D array or tensor), not a batch."""
    if getattr(prompts, "ndim", None) == 1:
        return True
    if isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], (str, bytes)):
        try:
            operator.index(prompts[0])
            return True
        except TypeError:
            return False
    return False
