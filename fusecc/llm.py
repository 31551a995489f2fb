"""The offline API:

    from fusecc import LLM, SamplingParams
    llm = LLM()                                   # embedded default model; or LLM("path/to/hf-dir", **engine_args)
    for out in llm.generate(["Hello", "Hi"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.outputs[0].text, out.outputs[0].finish_reason, out.metrics)
    llm.chat([{"role": "user", "content": "Hi"}], {"max_tokens": 32})
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Sequence

from fusecc.runtime.chat import chat_token_ids, render_chat
from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.outputs import RequestOutput
from fusecc.runtime.sampling_params import SamplingParams


class LLM:
    """An engine for offline batches, as vLLM's `LLM`.

    model: a local Hugging Face checkpoint folder, or None for the embedded default model.
    engine_args: EngineConfig's fields (fusecc/runtime/config.py; `fusecc-serve --help` lists
    them with their help), e.g. dtype ("auto", "float16", "bfloat16", "float32"), device,
    tokenizer, max_model_len, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization,
    num_kv_blocks, block_size, enable_prefix_caching, enable_chunked_prefill, enforce_eager,
    seed. An unknown name raises TypeError listing the valid ones.
    """

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine.from_engine_args(model, **engine_args)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens), unless generation_config="vllm"."""
        return self.engine.get_default_sampling_params()

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order.

        prompts: one prompt or a list; a prompt is a string, a list of token ids, or vLLM's
        {"prompt": text} / {"prompt_token_ids": ids}. sampling_params: a SamplingParams, a dict
        of its fields, or a list of either (one per prompt); None = get_default_sampling_params().
        """
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        if isinstance(params, (SamplingParams, dict)):
            params = [params] * len(prompts)
        params = [_as_params(p) for p in params]
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        # Only finished outputs are returned, so the engine need not build (or detokenize) the
        # partial ones every step.
        params = [dataclasses.replace(p, output_kind="final_only") for p in params]
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to conversations; outputs in conversation order.

        messages: one conversation (a list of {"role", "content"} dicts) or a list of them.
        chat_template: a Jinja template string or file; needed when the tokenizer has none.
        sampling_params, use_tqdm: as in generate().
        """
        conversations = messages if messages and isinstance(messages, list) and isinstance(messages[0], list) \
            else [messages]
        tok = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = render_chat(tok, conversation, chat_template, add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": chat_token_ids(tok, text)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
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


def _as_params(p) -> SamplingParams:
    if isinstance(p, SamplingParams):
        return p
    if isinstance(p, dict):
        names = [f.name for f in dataclasses.fields(SamplingParams)]
        unknown = sorted(set(p) - set(names))
        if unknown:
            raise TypeError(f"sampling_params dict: unknown SamplingParams field(s) {unknown}; "
                            f"valid fields: {', '.join(names)}")
        return SamplingParams(**p)
    raise TypeError(f"sampling_params must be SamplingParams, a dict of its fields, or a list of those, "
                    f"got {type(p).__name__}")


def _is_token_ids(prompts) -> bool:
    """One prompt of token ids (a list or tuple of integers, or a 1-D array or tensor), not a batch."""
    if getattr(prompts, "ndim", None) == 1:
        return True
    if isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], (str, bytes, dict)):
        try:
            operator.index(prompts[0])
            return True
        except TypeError:
            return False
    return False
