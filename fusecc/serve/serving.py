"""OpenAI completions and chat completions on top of AsyncLLMEngine.generate.

    serving = OpenAIServing(engine, "fusecc-tiny", metrics)
    body_or_events = await serving.completions(req, http_request)   # dict, or an async iterator of SSE lines

One HTTP request becomes one engine request per prompt (a batch prompt is several); each engine
request carries `n` choices. Choice index = prompt_index * n + output.index, as in OpenAI.

The engine yields cumulative outputs; streaming turns them into deltas per choice. The first output
of every engine request is awaited before any response byte is sent, so a full queue or an
engine-side rejection is a real HTTP status (429/400), not an error event inside a 200 stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio

from pydantic import ValidationError

from fusecc.runtime.async_engine import EngineShutDown
from fusecc.runtime.chat import chat_token_ids, render_chat
from fusecc.runtime.request_inputs import PromptTooLong, prompt_token_ids
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import SchedulerFullError
from fusecc.serve.disconnect import until_disconnected
from fusecc.serve.errors import APIError
from fusecc.serve.logprobs import LogprobFormatter
from fusecc.serve.unsupported import check_fields
from fusecc.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                   ChatCompletionRequest, ChatCompletionResponse, CompletionChoice, CompletionRequest,
                                   CompletionResponse, DeltaMessage, Usage)

logger = logging.getLogger("fusecc.serve")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = "1"


def shutting_down_error() -> APIError:
    return APIError(503, "the server is shutting down and ended this request before it finished; retry "
                         "on another instance", code="server_shutting_down", headers={"Retry-After": RETRY_AFTER_S})


def _engine_error(err: BaseException) -> BaseException:
    """The API error for an exception from the engine, or the exception itself when unexpected."""
    if isinstance(err, SchedulerFullError):
        return APIError(429, f"the server is busy: {err}", code="queue_full", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(err, EngineShutDown):  # the engine stopped under the request (a forced shutdown)
        return shutting_down_error()
    if isinstance(err, ValueError):
        return APIError.from_value_error(err, default_param="prompt")
    if isinstance(err, StopAsyncIteration):
        return APIError(500, "the engine ended the request without output")
    return err


@dataclass
class _Tracked:
    """One engine request: its id, prompt, the latest cumulative output and per-token timing."""

    request_id: str
    prompt_ids: list[int]
    last: object = None  # RequestOutput
    itls: list[float] = field(default_factory=list)
    _last_time: float | None = None
    _last_tokens: int = 0


class OpenAIServing:
    def __init__(self, engine, served_model_name: str, metrics, ending: asyncio.Event | None = None,
                 chat_template: str | None = None, default_sampling: dict | None = None) -> None:
        """ending: set when in-flight requests must end (shutdown); chat_template: a Jinja template
        that replaces the tokenizer's; default_sampling: request field -> value for fields a request
        leaves unset (the model's generation_config.json)."""
        self.engine = engine
        self.model_name = served_model_name
        self.metrics = metrics
        self.ending = ending
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.chat_template = chat_template
        self.default_sampling = dict(default_sampling or {})
        self.logprobs = LogprobFormatter(self.tokenizer)
        self._ignored_fields: set[str] = set()
        self.has_chat_template = chat_template is not None or _tokenizer_has_chat_template(self.tokenizer)
        if self.has_chat_template:
            self._warm_up_chat_template()

    def _warm_up_chat_template(self) -> None:
        """Compile the template now (transformers caches it), not on the first chat request. A
        template that does not parse fails the start; one that refuses this probe conversation
        (some insist on a system turn) may still serve others."""
        from jinja2 import TemplateSyntaxError

        try:
            render_chat(self.tokenizer, [{"role": "user", "content": "hi"}], self.chat_template)
        except TemplateSyntaxError:
            raise
        except Exception as exc:
            logger.warning("the chat template refused a one-message probe conversation: %s", exc)

    def parse(self, model_cls, body: bytes):
        """The request model of a JSON body, or a 400 naming the field; unknown fields are checked."""
        try:
            req = model_cls.model_validate_json(body)
        except ValidationError as exc:
            raise APIError.from_validation_error(exc, body) from None
        check_fields(req, self._ignored_fields)
        return req

    # ---- request -> engine inputs -------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _prompt_ids(self, prompt, field_name: str, truncate: int | None = None) -> list[int]:
        """The engine's own prompt checks (fusecc/runtime/request_inputs.py), run here because the
        default max_tokens needs the prompt's length before the request is queued."""
        if truncate is not None and not (truncate >= 1 or truncate == -1):
            truncate = None  # SamplingParams refuses the value, naming the field, when params are built
        try:
            _, ids = prompt_token_ids(prompt, self.tokenizer, self.vocab_size, self.max_model_len, truncate)
        except PromptTooLong as exc:
            raise APIError(400, f"{field_name}: {exc}", param=field_name, code="context_length_exceeded") from None
        except ValueError as exc:
            raise APIError(400, f"{field_name}: {exc}", param=field_name) from None
        return ids

    def _max_tokens(self, requested: int | None, default: int | None, prompt_len: int,
                    sent_as: str = "max_tokens") -> int:
        room = self.max_model_len - prompt_len
        default = self.default_sampling.get("max_tokens", default)
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(400, f"{sent_as}={requested} plus the prompt's {prompt_len} tokens exceeds the "
                                f"context of {self.max_model_len} tokens (at most {room} here)",
                           param=sent_as, code="context_length_exceeded")
        return requested

    @staticmethod
    def _logit_bias(req) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers written as strings)",
                           param="logit_bias") from None

    def _check_sequence_count(self, num_prompts: int, n: int) -> None:
        """More sequences than the engine's queue can hold is a request that can never run: a 400,
        not a 429 that clients (the openai SDK among them) would retry."""
        limit = getattr(self.engine, "max_waiting", None)
        if limit is not None and num_prompts * n > limit:
            # name the field that alone is over the limit; a batch within it is over through n
            culprit = "prompt" if num_prompts > limit else "n"
            batch = f"{num_prompts} prompts x n={n}" if num_prompts > 1 else f"n={n}"
            raise APIError(400, f"{batch} is {num_prompts * n} sequences; this server queues at most {limit}",
                           param=culprit)

    def _sampling_params(self, req, max_tokens: int, logprobs: int | None) -> SamplingParams:
        prompt_logprobs = req.prompt_logprobs
        if req.stream and prompt_logprobs is not None and prompt_logprobs > 0:  # vLLM's rule and words
            raise APIError(400, "`prompt_logprobs` are not available when `stream=True`", param="prompt_logprobs")
        if req.stream and prompt_logprobs == 0:
            prompt_logprobs = None  # accepted with stream (vLLM's), and nothing to return
        # generation_config defaults for the sampling fields the request left unset (vLLM's rule)
        sampling = {name: getattr(req, name) for name in _DEFAULTABLE}
        sampling.update({k: v for k, v in self.default_sampling.items() if k in _DEFAULTABLE
                         and k not in req.model_fields_set})
        try:
            return SamplingParams(
                n=req.n, **sampling, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop,
                stop_token_ids=req.stop_token_ids or [], max_tokens=max_tokens, min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                logit_bias=OpenAIServing._logit_bias(req),
                skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
                allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words or None,
                truncate_prompt_tokens=req.truncate_prompt_tokens)
        except ValueError as exc:
            raise APIError.from_value_error(exc) from None

    @staticmethod
    def _check_stream_options(req) -> None:
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise APIError(400, "messages is empty", param="messages")
        if not self.has_chat_template:
            # no made-up template: the model would be prompted in a format it was never trained on
            raise APIError(400, "this model has no chat template, so it cannot serve chat completions; start "
                                "the server with --chat-template FILE_OR_STRING", param="messages",
                           code="no_chat_template")
        for i, m in enumerate(req.messages):
            part = m.non_text_part()
            if part is not None:
                raise APIError(400, f"messages.{i}.content.{part}: content of type {m.content[part].type!r} is not "
                                    f"supported: this model takes text only", param="messages",
                               code="unsupported_content")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(self.tokenizer, messages, self.chat_template, req.add_generation_prompt)
        except Exception as exc:  # a template's raise_exception (roles must alternate, ...)
            raise APIError(400, f"chat template failed on these messages: {exc}", param="messages") from None
        return self._prompt_ids(chat_token_ids(self.tokenizer, text), "messages", req.truncate_prompt_tokens)

    # ---- engine -------------------------------------------------------------------------------

    async def _track(self, t: _Tracked, params: SamplingParams) -> AsyncIterator[object]:
        gen = self.engine.generate(t.prompt_ids, params, t.request_id)
        try:
            async for out in gen:
                now = time.perf_counter()
                ntok = sum(len(o.token_ids) for o in out.outputs)
                if ntok > t._last_tokens:
                    if t._last_time is not None:
                        t.itls.append(now - t._last_time)
                    t._last_time, t._last_tokens = now, ntok
                t.last = out
                if out.finished:
                    self.metrics.observe_request(out.metrics, t.itls)
                yield out
        finally:
            # Closing the engine's generator aborts the request there; the explicit abort covers a
            # generator that was closed before it started. Both are no-ops for a finished request.
            with anyio.CancelScope(shield=True):
                await gen.aclose()
                if t.last is None or not t.last.finished:
                    await self.engine.abort(t.request_id)

    async def _start(self, prompts: list[list[int]], params: list[SamplingParams], base_id: str):
        """Start one engine request per prompt (with its own params) and wait for each one's first output."""
        tracked = [_Tracked(f"{base_id}-{i}", ids) for i, ids in enumerate(prompts)]
        gens = [self._track(t, p) for t, p in zip(tracked, params)]
        firsts = await asyncio.gather(*(anext(g) for g in gens), return_exceptions=True)
        errors = [e for e in firsts if isinstance(e, BaseException)]
        if errors:
            for g in gens:
                await g.aclose()
            raise _engine_error(errors[0])
        return tracked, gens, firsts

    async def _run_to_end(self, request, prompts, params, base_id) -> list[object]:
        async def go():
            tracked, gens, _ = await self._start(prompts, params, base_id)

            async def drain(g):
                async for _ in g:
                    pass
            try:
                await asyncio.gather(*map(drain, gens))
            except EngineShutDown as exc:
                raise _engine_error(exc) from None
            return [t.last for t in tracked]
        return await until_disconnected(request, go(), self.ending)

    # ---- endpoints ----------------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, request, usage_out: dict):
        self.check_model(req.model)
        self._check_stream_options(req)
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            raw_prompts = p
        else:
            raw_prompts = [p]
        prompts = [self._prompt_ids(x, "prompt", req.truncate_prompt_tokens) for x in raw_prompts]
        self._check_sequence_count(len(prompts), req.n)
        # the default max_tokens is capped by each prompt's own room (vLLM's), not the longest one's
        params = [self._sampling_params(req, self._max_tokens(req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, len(ids)),
                                        req.logprobs) for ids in prompts]
        base_id = f"cmpl-{uuid.uuid4().hex}"
        echo = [x if isinstance(x, str) else self.tokenizer.decode(ids) for x, ids in zip(raw_prompts, prompts)]
        usage_out["prompt_tokens"] = sum(map(len, prompts))

        if req.stream:
            started = await until_disconnected(request, self._start(prompts, params, base_id), self.ending)
            return self._completion_events(req, started, base_id, echo, usage_out)

        finals = await self._run_to_end(request, prompts, params, base_id)
        choices = []
        for i, out in enumerate(finals):
            for o in out.outputs:
                prefix = echo[i] if req.echo else ""
                text = prefix + o.text
                # text_offset: character offsets into the returned text, the echoed prompt included
                lp = self.logprobs.completion(o, 0, len(prefix)) if req.logprobs is not None else None
                choices.append(CompletionChoice(index=i * req.n + o.index, text=text, logprobs=lp,
                                                finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                                                prompt_logprobs=self.logprobs.prompt(out.prompt_logprobs)))
        usage = self._usage(finals)
        usage_out["completion_tokens"] = usage.completion_tokens
        return CompletionResponse(id=base_id, model=self.model_name, choices=choices, usage=usage).model_dump()

    async def chat(self, req: ChatCompletionRequest, request, usage_out: dict):
        self.check_model(req.model)
        self._check_stream_options(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        prompt = self._chat_prompt(req)
        self._check_sequence_count(1, req.n)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        # errors name the field the client sent, not the SamplingParams field it became
        sent_as = {"max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
                   "logprobs": "top_logprobs" if req.top_logprobs is not None else "logprobs"}
        try:
            max_tokens = self._max_tokens(requested, None, len(prompt), sent_as["max_tokens"])
            params = self._sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        except APIError as exc:
            exc.param = sent_as.get(exc.param, exc.param)
            raise
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        usage_out["prompt_tokens"] = len(prompt)

        if req.stream:
            started = await until_disconnected(request, self._start([prompt], [params], base_id), self.ending)
            return self._chat_events(req, started, base_id, usage_out)

        (final,) = await self._run_to_end(request, [prompt], [params], base_id)
        choices = [ChatChoice(index=o.index, message=AssistantMessage(content=o.text),
                              logprobs=self.logprobs.chat(o, 0, req.top_logprobs or 0) if req.logprobs else None,
                              finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                   for o in final.outputs]
        usage = self._usage([final])
        usage_out["completion_tokens"] = usage.completion_tokens
        return ChatCompletionResponse(id=base_id, model=self.model_name, choices=choices, usage=usage,
                                      prompt_logprobs=self.logprobs.prompt(final.prompt_logprobs)).model_dump()

    # ---- streaming ----------------------------------------------------------------------------

    async def _deltas(self, started, n: int, usage_out: dict):
        """Yield (choice_index, new_text, output, start_token, finish_reason_or_None) per change."""
        tracked, gens, firsts = started
        sent: dict[int, tuple[int, int, bool]] = {}  # choice -> (chars, tokens, finish sent)

        def changes(i: int, out):
            for o in out.outputs:
                idx = i * n + o.index
                chars, toks, done = sent.get(idx, (0, 0, False))
                if done:
                    continue
                finished = o.finish_reason is not None
                if len(o.text) > chars or len(o.token_ids) > toks or finished:
                    sent[idx] = (len(o.text), len(o.token_ids), finished)
                    yield idx, o.text[chars:], o, toks, o.finish_reason if finished else None

        merged = _merge(gens)
        try:
            for i, out in enumerate(firsts):
                for change in changes(i, out):
                    yield change
            async for i, out in merged:
                for change in changes(i, out):
                    yield change
        finally:
            with anyio.CancelScope(shield=True):
                await merged.aclose()  # first: it may be iterating the engine generators
                for g in gens:
                    await g.aclose()
            usage_out["completion_tokens"] = sum(len(o.token_ids) for t in tracked if t.last
                                                 for o in t.last.outputs)

    def _stream_usage(self, started) -> Usage:
        return self._usage([t.last for t in started[0]])

    async def _completion_events(self, req, started, base_id, echo, usage_out) -> AsyncIterator[str]:
        created = int(time.time())
        deltas = self._deltas(started, req.n, usage_out)
        try:
            echoed = set()
            offsets: dict[int, int] = {}  # choice -> text_offset of its next token (the stream goes on)
            async for idx, text, o, start, finish in deltas:
                if req.echo and idx not in echoed:
                    echoed.add(idx)
                    text = echo[idx // req.n] + text
                    offsets[idx] = len(echo[idx // req.n])
                lp = None
                if req.logprobs is not None:
                    lp = self.logprobs.completion(o, start, offsets.get(idx, 0))
                    if lp.tokens:
                        offsets[idx] = lp.text_offset[-1] + len(lp.tokens[-1])
                chunk = CompletionResponse(id=base_id, created=created, model=self.model_name, choices=[
                    CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=finish,
                                     stop_reason=o.stop_reason if finish else None)])
                yield _chunk_sse(chunk)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({"id": base_id, "object": "text_completion", "created": created, "model": self.model_name,
                            "choices": [], "usage": self._stream_usage(started).model_dump()})
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield _stream_error(exc)
        finally:
            await deltas.aclose()

    async def _chat_events(self, req, started, base_id, usage_out) -> AsyncIterator[str]:
        created = int(time.time())
        deltas = self._deltas(started, req.n, usage_out)

        def chunk(choices, usage=None):
            return _chunk_sse(ChatCompletionChunk(id=base_id, created=created, model=self.model_name, choices=choices,
                                                  usage=usage))
        try:
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(req.n)])
            async for idx, text, o, start, finish in deltas:
                lp = self.logprobs.chat(o, start, req.top_logprobs or 0) if req.logprobs else None
                delta = DeltaMessage(content=text) if text else DeltaMessage()
                yield chunk([ChatChunkChoice(index=idx, delta=delta, logprobs=lp, finish_reason=finish)])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=self._stream_usage(started))
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield _stream_error(exc)
        finally:
            await deltas.aclose()

    # ---- output conversion --------------------------------------------------------------------

    @staticmethod
    def _usage(finals) -> Usage:
        prompt = sum(len(f.prompt_token_ids) for f in finals)
        completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# Sampling fields a model's generation_config.json may give defaults for (vLLM's list; max_tokens
# is handled by _max_tokens).
_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _tokenizer_has_chat_template(tok) -> bool:
    # HF tokenizers have a chat_template attribute (None without one); the embedded byte tokenizer
    # has its own documented template in code and no attribute
    return hasattr(tok, "apply_chat_template") and getattr(tok, "chat_template", "") is not None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _chunk_sse(chunk) -> str:
    """A stream chunk without its unset optional fields, except the ones OpenAI's chunk schema
    requires even when null: every choice's finish_reason and logprobs."""
    body = chunk.model_dump(exclude_none=True)
    for choice in body["choices"]:
        choice.setdefault("finish_reason", None)
        choice.setdefault("logprobs", None)
    return _sse(body)


def _stream_error(exc: Exception) -> str:
    """A failure after the 200 and the first chunks went out: the status cannot change any more, so
    the stream ends with an error event and [DONE] (as vLLM's) instead of a cut connection."""
    error = _engine_error(exc)
    if not isinstance(error, APIError):
        logger.error("stream failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        error = APIError(500, f"the request failed mid-stream: {type(exc).__name__}: {exc}")
    return error.sse()


async def _merge(gens) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators as items arrive; yields (iterator index, item)."""
    if len(gens) == 1:
        async for x in gens[0]:
            yield 0, x
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(i, g):
        try:
            async for x in g:
                await queue.put((i, x, None))
            await queue.put((i, None, done))
        except Exception as exc:
            await queue.put((i, None, exc))

    tasks = [asyncio.ensure_future(drain(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, x, end = await queue.get()
            if end is done:
                remaining -= 1
            elif end is not None:
                raise end
            else:
                yield i, x
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
