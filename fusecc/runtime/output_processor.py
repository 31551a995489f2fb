"""From sampled tokens to RequestOutputs: detokenization, stop decisions, logprobs, output kinds.

    processor.add(request_id, prompt, prompt_ids, seqs, params, arrival)   # after the engine's checks
    processor.note_scheduled(scheduler_output)                  # prefix-cache hits at first admission
    for seq, stop in processor.process_tokens(scheduler_output, sampled, token_ids):   # + prompt logprobs
        scheduler.finish(seq, stop.reason, stop.stop_reason)    # the scheduler frees what it is told
    outputs = processor.make_outputs(scheduler.take_finished())

vLLM v1's OutputProcessor. A request with n > 1 is n sequences ("<id>#<i>") reported together.
Text is decoded token by token (IncrementalDetokenizer) when the request is reported per step
("cumulative", "delta") or has stop strings to look for; otherwise ("final_only") once at the end.
Prompt logprobs arrive chunk by chunk (the model runner computes each prompt position once,
fusecc/runtime/prompt_logprobs.py) and are complete by the request's first output, which follows
the step that computes its last prompt chunk. The n sequences of a request share its prompt: only
the first computes the prompt logprobs (the others may read the prefix cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fusecc.runtime.detokenizer import IncrementalDetokenizer
from fusecc.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import SchedulerOutput
from fusecc.runtime.sequence import Sequence
from fusecc.runtime.stop_checker import Stop, check_stop


@dataclass
class _Child:
    seq: Sequence
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    incremental: bool  # detokenize every step, else once at the end
    cumulative_logprob: float = 0.0
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission (preemption resets the seq's)
    # "delta" outputs: how much of the text / tokens earlier outputs carried, and whether the finish was reported
    sent_text: int = 0
    sent_tokens: int = 0
    sent_finish: bool = False


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    arrival_time: float
    output_kind: str
    finished: set[int] = field(default_factory=set)  # child indices
    # [None, {token id: Logprob} per prompt token so far] when SamplingParams.prompt_logprobs is set
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False  # "delta": the first output carried them


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests: dict[str, _Request] = {}
        self._by_seq: dict[str, tuple[_Request, int]] = {}  # sequence id -> (request, child index)
        self._touched: dict[str, _Request] = {}  # requests to report after this step
        self.generation_tokens_total = 0

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], seqs: list[Sequence],
            params: SamplingParams, arrival: float) -> None:
        incremental = params.output_kind != "final_only" or bool(params.stop)
        children = [_Child(s, IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop,
                                                     params.skip_special_tokens, params.include_stop_str_in_output),
                           [] if params.logprobs is not None else None, incremental) for s in seqs]
        req = _Request(request_id, prompt, prompt_ids, children, arrival, params.output_kind,
                       prompt_logprobs=None if params.prompt_logprobs is None else [None])
        for s in seqs[1:]:  # the first sequence computes the shared prompt's logprobs
            if s.sampling_params.prompt_logprobs is not None:
                s.sampling_params = dataclasses.replace(s.sampling_params, prompt_logprobs=None)
        self.requests[request_id] = req
        for i, s in enumerate(seqs):
            self._by_seq[s.request_id] = (req, i)

    def has_sequence(self, seq_id: str) -> bool:
        return seq_id in self._by_seq

    def note_scheduled(self, out: SchedulerOutput) -> None:
        for e in out.scheduled:
            if not e.is_prefill:  # a decode was a prefill in an earlier step, which recorded it
                continue
            found = self._by_seq.get(e.seq.request_id)
            if found is not None and found[0].children[found[1]].num_cached_tokens is None:
                found[0].children[found[1]].num_cached_tokens = e.seq.num_cached_tokens

    def process_tokens(self, out: SchedulerOutput, sampled, token_ids: list[int]) -> list[tuple[Sequence, Stop]]:
        """After Scheduler.postprocess appended the step's tokens: detokenize, record logprobs and
        decide which sequences stop (the caller finishes them in the scheduler)."""
        if sampled is not None and sampled.prompt_logprobs is not None:
            self._add_prompt_logprobs(sampled.prompt_logprobs)
        stops = []
        lps = _LogprobRows.of_sampled(sampled, self.tokenizer)
        for row, e in enumerate(out.sampled):
            found = self._by_seq.get(e.seq.request_id)
            if found is None or e.seq.is_finished:  # aborted between schedule and postprocess
                continue
            req, i = found
            child = req.children[i]
            self.generation_tokens_total += 1
            if child.logprobs is not None:
                child.logprobs.append(lps.entry(row, token_ids[row], e.seq.sampling_params.logprobs))
                child.cumulative_logprob += lps.sampled[row]
            new_text = child.detok.add_tokens([token_ids[row]]) if child.incremental else ""
            stop = check_stop(e.seq, self.eos_token_ids, self.max_model_len,
                              child.detok if child.incremental else None, len(new_text))
            if stop is not None:
                stops.append((e.seq, stop))
            if req.output_kind != "final_only":
                self._touched[req.request_id] = req
        return stops

    def _add_prompt_logprobs(self, plp) -> None:
        """Append a step's prompt logprobs (fusecc/runtime/prompt_logprobs.py PromptLogprobs) to
        their requests' lists: each span continues its request's list where the last one ended."""
        rows = _LogprobRows(plp.logprobs, plp.ranks, plp.top_token_ids, plp.top_logprobs, self.tokenizer)
        row = 0
        for span in plp.spans:
            found = self._by_seq.get(span.seq.request_id)
            req = found[0] if found is not None else None  # None: aborted meanwhile
            if req is not None and req.prompt_logprobs is not None:
                assert span.first_target == len(req.prompt_logprobs), \
                    (span.seq.request_id, span.first_target, len(req.prompt_logprobs))
                k = span.seq.sampling_params.prompt_logprobs
                req.prompt_logprobs += [rows.entry(row + j, t, k) for j, t in enumerate(span.target_ids)]
            row += span.count

    def make_outputs(self, finished: list[Sequence]) -> list[RequestOutput]:
        """The outputs of this step, given the sequences the scheduler finished (aborts included)."""
        for seq in finished:
            req, i = self._by_seq.pop(seq.request_id)
            req.finished.add(i)
            child = req.children[i]
            if not child.incremental:
                _detokenize_at_finish(child.detok, seq)
            elif seq.finish_reason != "abort" and not isinstance(seq.stop_reason, str):
                child.detok.flush()
            if req.output_kind != "final_only" or len(req.finished) == len(req.children):
                self._touched[req.request_id] = req
        outputs = [self._output(req) for req in self._touched.values()]
        self._touched = {}
        for o in outputs:
            if o.finished:
                del self.requests[o.request_id]
        return outputs

    def _output(self, req: _Request) -> RequestOutput:
        finished = len(req.finished) == len(req.children)
        completions = [c for i, child in enumerate(req.children)
                       if (c := _completion(i, child, req.output_kind == "delta")) is not None]
        seqs = [c.seq for c in req.children]
        metrics = RequestMetrics(
            arrival_time=req.arrival_time,
            first_scheduled_time=_min(s.first_scheduled_time for s in seqs),
            first_token_time=_min(s.first_token_time for s in seqs),
            finished_time=max(s.finished_time for s in seqs) if finished else None,
            num_cached_tokens=max(c.num_cached_tokens or 0 for c in req.children))
        prompt_logprobs = req.prompt_logprobs
        if prompt_logprobs is not None and req.output_kind == "delta":  # once, complete, then [] (vLLM's)
            if req.prompt_logprobs_sent or not (len(prompt_logprobs) == len(req.prompt_token_ids) or finished):
                prompt_logprobs = []
            else:
                req.prompt_logprobs_sent = True
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), completions, finished, metrics,
                             prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs))


def _completion(index: int, c: _Child, delta: bool) -> CompletionOutput | None:
    text = c.detok.text if c.seq.is_finished else c.detok.stable_text()
    tokens = c.seq.output_token_ids
    logprobs = None if c.logprobs is None else list(c.logprobs)
    if delta:  # only what earlier outputs did not carry; a child with nothing new is left out
        if len(tokens) == c.sent_tokens and len(text) == c.sent_text and (c.sent_finish or not c.seq.is_finished):
            return None
        text, tokens, logprobs = text[c.sent_text:], tokens[c.sent_tokens:], \
            None if logprobs is None else logprobs[c.sent_tokens:]
        c.sent_text, c.sent_tokens, c.sent_finish = c.sent_text + len(text), c.sent_tokens + len(tokens), \
            c.seq.is_finished
    return CompletionOutput(index=index, text=text, token_ids=tokens, finish_reason=c.seq.finish_reason,
                            stop_reason=c.seq.stop_reason, logprobs=logprobs,
                            cumulative_logprob=None if c.logprobs is None else c.cumulative_logprob)


class _LogprobRows:
    """A step's logprob tensors, read back once for all rows (the sampler computes them only
    when some row asked for logprobs; the model runner, prompt logprobs likewise)."""

    def __init__(self, logprobs, ranks, top_ids, top_lps, tokenizer) -> None:
        """logprobs, ranks: [N] of the token each row is about; top_ids, top_lps: [N, K] or None."""
        self._tokenizer = tokenizer
        self.sampled = logprobs.tolist() if logprobs is not None else []
        self.ranks = ranks.tolist() if logprobs is not None else []
        top = logprobs is not None and top_ids is not None
        self.top_ids = top_ids.tolist() if top else None
        self.top_lps = top_lps.tolist() if top else None

    @classmethod
    def of_sampled(cls, sampled, tokenizer) -> "_LogprobRows":
        if sampled is None:
            return cls(None, None, None, None, tokenizer)
        return cls(sampled.logprobs, sampled.ranks, sampled.top_token_ids, sampled.top_logprobs, tokenizer)

    def entry(self, row: int, token: int, k: int) -> dict[int, Logprob]:
        """The row's token first (sampled or prompt; its rank computed over the whole
        distribution), then the top k."""
        out = {token: Logprob(self.sampled[row], self.ranks[row], self._decode(token))}
        if k and self.top_ids is not None:
            for rank, (t, lp) in enumerate(zip(self.top_ids[row][:k], self.top_lps[row][:k]), start=1):
                if t not in out:
                    out[t] = Logprob(lp, rank, self._decode(t))
        return out

    def _decode(self, token: int) -> str:
        return self._tokenizer.decode([token], skip_special_tokens=False)


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
