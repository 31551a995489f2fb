"""LLMEngine: requests in, cumulative RequestOutputs out, one scheduled step at a time.

    engine = LLMEngine.from_engine_args("path/to/hf-dir", max_model_len=2048, enforce_eager=False)
    engine.add_request("r0", "Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

A step: scheduler.schedule() -> ModelRunner.execute (forward + sampler) -> scheduler.postprocess
-> incremental detokenization and stop strings (scheduler.finish) -> scheduler.take_finished().
A request with n > 1 runs as n sequences "<id>#<i>" (seeds seed + i), reported together.
A request is reported after every step that gave it a token, or only once finished when its
SamplingParams.output_kind is "final_only" (then, without stop strings, its text is decoded once
at the end instead of token by token). `stats().step_timings` says where step time goes.

Thread safety: add_request / abort_request / step may be called from different threads (the
async engine adds and aborts from the event loop while a background thread steps); the lock is
not held during the forward pass, which the scheduler tolerates (an abort between schedule and
postprocess is skipped by postprocess).
"""

from __future__ import annotations

import dataclasses
import operator
import threading
import time
from dataclasses import dataclass, field

import torch

from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.detokenizer import IncrementalDetokenizer
from fusecc.runtime.model_runner import ModelRunner
from fusecc.runtime.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput, StepTimings
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import Scheduler, SchedulerFullError
from fusecc.runtime.sequence import Sequence


@dataclass
class _Child:
    seq: Sequence
    detok: IncrementalDetokenizer
    logprobs: list[dict] | None
    # prefix-cache hit at first admission (BlockManager.free resets the sequence's own count)
    num_cached_tokens: int | None = None
    # Detokenize every step (cumulative outputs, or stop strings to look for); else once at the end.
    incremental: bool = True


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    arrival_time: float
    finished: set[int] = field(default_factory=set)  # child indices
    cumulative: bool = True  # report after every step (output_kind "cumulative"), else once finished


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, *, eos_token_ids=(), model_name: str = "",
                 device=None, enforce_eager: bool | None = None) -> None:
        """model: a fusecc model (fusecc/runtime/models) already on its device; config.device and
        config.enforce_eager say how to run it. `device` / `enforce_eager`, when given, override
        those two fields (the signature before they were EngineConfig fields)."""
        if device is not None:
            config = dataclasses.replace(config, device=str(device))
        if enforce_eager is not None:
            config = dataclasses.replace(config, enforce_eager=enforce_eager)
        config.check_supported()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.runner = ModelRunner(model, config)
        self.config = self.runner.config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(self.config.num_kv_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager, self.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[str, tuple[_Request, int]] = {}  # sequence id -> (request, child index)
        self._lock = threading.RLock()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.step_timings = StepTimings()

    @classmethod
    def from_engine_args(cls, model: str | None = None, **engine_args) -> "LLMEngine":
        """model: a local Hugging Face checkpoint directory, or None for the embedded default.
        engine_args: EngineConfig fields (fusecc/runtime/engine_args.py lists them; dtype may also be a torch.dtype)."""
        from fusecc.runtime import loader
        from fusecc.runtime.engine_args import check_engine_kwargs
        from fusecc.runtime.models.registry import max_context_len

        if isinstance(engine_args.get("dtype"), torch.dtype):
            engine_args["dtype"] = loader.dtype_name(engine_args["dtype"])
        check_engine_kwargs(engine_args)
        config = EngineConfig(**engine_args)
        config.check_supported()
        device = loader.resolve_device(config.device)
        if model is None:
            from fusecc.runtime.byte_tokenizer import ByteTokenizer
            from fusecc.runtime.default_model import DEFAULT_MODEL_NAME, build_default_model, default_config

            hf_config = default_config()
            config = _fit_max_model_len(config, max_context_len(hf_config))
            dtype = loader.resolve_dtype(config.dtype, hf_config, device)
            net, hf_config = build_default_model(dtype, device, config.max_model_len)
            tokenizer, name = ByteTokenizer(), DEFAULT_MODEL_NAME
            eos = loader.eos_token_ids(None, hf_config, tokenizer)
        else:
            hf_config = loader.load_config(model)
            config = _fit_max_model_len(config, max_context_len(hf_config))
            dtype = loader.resolve_dtype(config.dtype, hf_config, device)
            net = loader.load_model(model, dtype, device, config.max_model_len, config=hf_config)
            tokenizer = loader.load_tokenizer(config.tokenizer or model)
            name = str(model)
            eos = loader.eos_token_ids(model, hf_config, tokenizer)
        return cls(net, tokenizer, config, eos_token_ids=eos, model_name=name)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    # --- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Validate and queue. ValueError (bad params or prompt) / SchedulerFullError leave nothing queued."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params._validate()  # fields may have been changed since construction
        if isinstance(prompt, str):
            text, ids = prompt, list(self.tokenizer.encode(prompt))
        else:
            prompt = list(prompt)  # an iterator would be consumed by the checks below
            if any(isinstance(t, bool) for t in prompt):
                raise ValueError("prompt token ids must be integers, got a bool")
            try:  # ints and integer scalars (numpy, 0-d tensors); int(1.7) would silently be 1
                text, ids = None, [operator.index(t) for t in prompt]
            except TypeError:
                raise ValueError(f"prompt token ids must be integers, got {prompt!r:.80}") from None
        # text too: a tokenizer's added tokens may lie past the model's embedding rows
        if any(t < 0 or t >= self.runner.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
        outside = [t for t in (params.logit_bias or {}) if t >= self.runner.vocab_size]
        if outside:
            raise ValueError(f"SamplingParams.logit_bias token id {outside[0]} is outside the vocabulary "
                             f"[0, {self.runner.vocab_size})")
        # n sequences that could never all wait in the queue: refused before any is built (a
        # huge n would otherwise hold the caller for seconds, then fail as "queue full")
        if params.n > self.config.max_waiting:
            raise ValueError(f"SamplingParams.n must be <= max_waiting ({self.config.max_waiting}), got {params.n}")
        self._check_room(params.n)  # again under the lock below; this one spares building the children
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child_params = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seq = Sequence(seq_id, ids, child_params, block_size=self.config.block_size, priority=priority,
                           arrival_time=arrival)
            detok = IncrementalDetokenizer(self.tokenizer, ids, child_params.stop, child_params.skip_special_tokens)
            incremental = params.output_kind == "cumulative" or bool(child_params.stop)
            children.append(_Child(seq, detok, [] if params.logprobs is not None else None,
                                   incremental=incremental))
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._check_room(params.n)
            req = _Request(request_id, text, ids, children, arrival, cumulative=params.output_kind == "cumulative")
            added = []
            try:
                for i, c in enumerate(children):
                    self.scheduler.add(c.seq)
                    added.append(c.seq)
                    self._by_seq[c.seq.request_id] = (req, i)
            except BaseException:
                for seq in added:
                    self.scheduler.abort(seq.request_id)
                    self._by_seq.pop(seq.request_id, None)
                self.scheduler.forget_finished(added)  # nothing was queued as far as the caller is concerned
                raise
            self._requests[request_id] = req
            self.prompt_tokens_total += len(ids) * params.n

    def _check_room(self, n: int) -> None:
        if len(self.scheduler.waiting) + n > self.config.max_waiting:
            raise SchedulerFullError(f"{len(self.scheduler.waiting)} requests waiting "
                                     f"(max_waiting={self.config.max_waiting})")

    def abort_request(self, request_id: str) -> bool:
        """Abort all sequences of a request; its final output (finish_reason 'abort') comes from step()."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return False
            for c in req.children:
                self.scheduler.abort(c.seq.request_id)
            return True

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests)

    # --- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        with self._lock:
            out = self.scheduler.schedule()
            for e in out.scheduled:
                if not e.is_prefill:  # a decode was a prefill in an earlier step, which recorded it
                    continue
                found = self._by_seq.get(e.seq.request_id)
                if found is not None and found[0].children[found[1]].num_cached_tokens is None:
                    found[0].children[found[1]].num_cached_tokens = e.seq.num_cached_tokens
        t1 = time.perf_counter()
        sampled = self.runner.execute(out, self.eos_token_ids) if not out.is_empty else None
        t2 = time.perf_counter()
        token_ids = sampled.token_ids.tolist() if sampled is not None else []  # the step's only sync
        t3 = time.perf_counter()
        with self._lock:
            self.scheduler.postprocess(out, token_ids)
            touched: dict[str, _Request] = {}
            for row, e in enumerate(out.sampled):
                found = self._by_seq.get(e.seq.request_id)
                if found is None or e.seq.is_finished and e.seq.finish_reason == "abort":
                    continue
                req, i = found
                child = req.children[i]
                self.generation_tokens_total += 1
                if child.logprobs is not None:
                    child.logprobs.append(_logprob_entry(sampled, row, token_ids[row], child.seq.sampling_params))
                if child.incremental:
                    new_text = child.detok.add_tokens([token_ids[row]])
                    # as vLLM: no stop string ends a request before min_tokens are out
                    too_early = e.seq.num_output_tokens < e.seq.sampling_params.min_tokens
                    stop = None if too_early else child.detok.check_stop(len(new_text))
                    if stop is not None:
                        self.scheduler.finish(child.seq, "stop", stop)
                if req.cumulative:
                    touched[req.request_id] = req
            for seq in self.scheduler.take_finished():
                req, i = self._by_seq.pop(seq.request_id)
                req.finished.add(i)
                child = req.children[i]
                if not child.incremental:
                    _detokenize_at_finish(child.detok, seq)
                elif seq.finish_reason != "abort" and not isinstance(seq.stop_reason, str):
                    child.detok.flush()
                if req.cumulative or len(req.finished) == len(req.children):
                    touched[req.request_id] = req
            outputs = [self._output(req) for req in touched.values()]
            for o in outputs:
                if o.finished:
                    del self._requests[o.request_id]
            if out.scheduled:
                self._note_step(out.scheduled[-1].is_prefill, t0, t1, t2, t3, time.perf_counter())
        return outputs

    def _note_step(self, has_prefill: bool, t0: float, t1: float, t2: float, t3: float, t4: float) -> None:
        # scheduled is decodes first, so the last entry tells whether any is a prefill
        t = self.step_timings
        if has_prefill:
            t.prefill_steps += 1
            t.prefill_seconds += t4 - t0
            t.prefill_wait_seconds += t3 - t2
        else:
            t.decode_steps += 1
            t.decode_seconds += t4 - t0
            t.decode_wait_seconds += t3 - t2
        t.schedule_seconds += t1 - t0
        t.execute_seconds += t2 - t1
        t.postprocess_seconds += t4 - t3

    def _output(self, req: _Request) -> RequestOutput:
        finished = len(req.finished) == len(req.children)
        completions = [CompletionOutput(index=i, text=c.detok.text if c.seq.is_finished else c.detok.stable_text(),
                                        token_ids=c.seq.output_token_ids,
                                        finish_reason=c.seq.finish_reason, stop_reason=c.seq.stop_reason,
                                        logprobs=None if c.logprobs is None else list(c.logprobs))
                       for i, c in enumerate(req.children)]
        seqs = [c.seq for c in req.children]
        metrics = RequestMetrics(
            arrival_time=req.arrival_time,
            first_scheduled_time=_min(s.first_scheduled_time for s in seqs),
            first_token_time=_min(s.first_token_time for s in seqs),
            finished_time=max(s.finished_time for s in seqs) if finished else None,
            num_cached_tokens=max(c.num_cached_tokens or 0 for c in req.children))
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), completions, finished, metrics)

    def stats(self) -> EngineStats:
        with self._lock:
            s, bm = self.scheduler, self.block_manager
            timings = dataclasses.replace(self.step_timings, graph_replays=self.runner.num_graph_replays)
            return EngineStats(
                num_running=len(s.running), num_waiting=len(s.waiting), kv_cache_usage=bm.usage,
                num_preemptions=s.stats.num_preemptions, prefix_cache_queries=bm.stats.prefix_cache_queries,
                prefix_cache_hits=bm.stats.prefix_cache_hits, prompt_tokens_total=self.prompt_tokens_total,
                generation_tokens_total=self.generation_tokens_total,
                finished_by_reason=dict(s.stats.num_finished), peak_kv_cache_usage=bm.peak_usage,
                num_kv_blocks=bm.num_blocks, step_timings=timings)


def _fit_max_model_len(config: EngineConfig, model_limit: int) -> EngineConfig:
    if config.max_model_len <= model_limit:
        return config
    return dataclasses.replace(config, max_model_len=model_limit)


def _min(values):
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _detokenize_at_finish(detok: IncrementalDetokenizer, seq: Sequence) -> None:
    """The text of a request that was not detokenized step by step (final_only, no stop strings):
    token by token, exactly as the step-by-step path does. (All at once is not the same: when the
    prompt ends inside a UTF-8 character that the first output token completes, the incremental
    detokenizer's prefix check fails and a whole-output decode would come out empty.)"""
    for token in seq.output_token_ids:
        detok.add_tokens([token])
    if seq.finish_reason != "abort":  # an aborted request holds a trailing incomplete character back
        detok.flush()


def _logprob_entry(sampled, row: int, token_id: int, params: SamplingParams) -> dict:
    top = []
    if params.logprobs and sampled.top_token_ids is not None:
        ids = sampled.top_token_ids[row, :params.logprobs].tolist()
        lps = sampled.top_logprobs[row, :params.logprobs].tolist()
        top = list(zip(ids, lps))
    return {"token_id": token_id, "logprob": float(sampled.logprobs[row]), "top": top}
