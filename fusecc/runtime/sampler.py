"""Sampling of the next token for a batch of sequences, vectorised over the batch.

    md = SamplingMetadata.build(seqs, vocab_size=logits.shape[-1], device=logits.device, eos_token_ids={2})
    out = Sampler(seed=0)(logits, md)           # logits: [num_seqs, vocab], row i <-> seqs[i]
    out.token_ids                                 # [num_seqs] int64, on logits.device

Processing order (vLLM v1's), each step skipped when no row uses it:
0. logit_bias: each row's biases are added to its logits.
1. masks (-inf): tokens outside a row's allowed_token_ids; the last token of a bad word whose
   other tokens end the row's output (a one-token bad word always); and stop tokens
   (stop_token_ids, and EOS unless ignore_eos) while a row has fewer than min_tokens outputs.
2. penalties: repetition (tokens in prompt or output: positive logits / p, negative * p), then
   frequency (- f * count in output) and presence (- p if in output), as OpenAI defines them.
3. greedy rows (temperature < 1e-5): exact argmax of the logits so far.
4. temperature, then min_p (relative to the most likely token), top_k, top_p (ties at the k-th
   value are all kept; top_p keeps the smallest most-likely set with mass >= p, at least 1 token).
   When every row has top_k <= TOPK_FAST_MAX, only the `max k` best candidates are sorted
   (torch.topk) instead of the whole vocabulary (256 rows x 128k vocab, top_k=50 + top_p=0.95,
   on an H100: 5.2 ms -> 1.4 ms per step), unless a sampled row ties at its k-th value past
   those candidates: then the whole vocabulary is sorted, so that a seeded row keeps all its
   ties and draws the same tokens in any batch.
5. sampling by the exponential race: argmax(probs / Exp(1) noise) draws from probs. The noise of a
   row with a seed comes from a generator seeded with hash(seed, number of outputs so far), so its
   tokens do not depend on the batch it lands in, nor on preemption.

When every row is greedy with no penalty, no bias, no mask and no logprobs (the
common offline case) the sampler is a single argmax of the logits (`plain_greedy`): the same
tokens as steps 1-3, without the [B, V] float32 copy or any per-row tensors.

Logprobs (`logprobs_mode`):
- "raw" (default, as vLLM and OpenAI): log_softmax of the model's logits as given.
- "processed": log_softmax of the logits sampled from, i.e. after steps 1-4; tokens cut by
  top-k/top-p/min-p have -inf. For greedy rows: after steps 1-2, at temperature 1, uncut.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence as Seq

import torch

if TYPE_CHECKING:
    from fusecc.runtime.prompt_logprobs import PromptLogprobs

_MASK64 = (1 << 64) - 1
TOPK_FAST_MAX = 1024


@dataclass
class SamplingMetadata:
    """Per-row parameters as tensors on the logits' device; optional fields are None when unused."""

    temperature: torch.Tensor  # [B] float32; greedy rows hold 1.0
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; V = off
    max_top_k: int  # max over sampled (non-greedy) rows of top_k, V when one has it off
    top_p: torch.Tensor | None  # [B] float32; 1 = off
    min_p: torch.Tensor | None  # [B] float32; 0 = off
    repetition_penalty: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32
    # Flat (row, token id) pairs, one per token occurrence, of the rows that use a penalty:
    # prompt tokens for the repetition penalty, output tokens for all three.
    prompt_tokens: tuple[torch.Tensor, torch.Tensor] | None
    output_tokens: tuple[torch.Tensor, torch.Tensor] | None
    stop_mask_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) to set to -inf
    # (rows, token ids) that rows with allowed_token_ids may sample; their other tokens get -inf
    allowed_index: tuple[torch.Tensor, torch.Tensor] | None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, float32 biases)
    step_seeds: list[int | None]  # per row: this step's generator seed, None = the sampler's generator
    max_num_logprobs: int | None  # top-n to return (max over rows); None = no logprobs
    # Every row is greedy with nothing to apply before the argmax (no penalty, no min_tokens
    # masking, no logprobs): the sampler is one argmax of the logits as given.
    plain_greedy: bool = False

    @classmethod
    def build(cls, seqs: Seq, vocab_size: int, device: torch.device | str = "cpu",
              eos_token_ids: Iterable[int] = ()) -> "SamplingMetadata":
        """From sequences (anything with .sampling_params, .prompt_token_ids, .output_token_ids)."""
        params = [s.sampling_params for s in seqs]
        if all(is_plain_greedy(s, p) for s, p in zip(seqs, params)):
            B = len(params)
            temperature, greedy = _plain_greedy_columns(B, torch.device(device))
            return cls(temperature=temperature, greedy=greedy, all_greedy=True, top_k=None, max_top_k=vocab_size,
                       top_p=None, min_p=None, repetition_penalty=None, presence_penalty=None, frequency_penalty=None,
                       prompt_tokens=None, output_tokens=None, stop_mask_index=None, allowed_index=None,
                       logit_bias=None, step_seeds=[None] * B, max_num_logprobs=None, plain_greedy=True)
        eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
        greedy = [p.is_greedy for p in params]

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        def opt(values: list, off, dtype=torch.float32) -> torch.Tensor | None:
            return col(values, dtype) if any(v != off for v in values) else None

        # Greedy rows ignore the sampling filters; keeping them off makes their processed
        # logprobs the plain (penalised) distribution.
        top_k = [vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        rep = [p.repetition_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        outputs = [s.output_token_ids for s in seqs]
        rep_rows = [i for i, r in enumerate(rep) if r != 1.0]
        pen_rows = [i for i, (r, pr, f) in enumerate(zip(rep, presence, freq)) if r != 1.0 or pr != 0.0 or f != 0.0]
        any_rep, any_out_pen = bool(rep_rows), any(v != 0.0 for v in presence + freq)

        rows, cols = [], []
        for i, (s, p, out) in enumerate(zip(seqs, params, outputs)):
            if len(out) < p.min_tokens:
                stop = set(t for t in p.stop_token_ids if t < vocab_size) | (set() if p.ignore_eos else set(eos))
                rows += [i] * len(stop)
                cols += sorted(stop)
        for i, (s, out) in enumerate(zip(seqs, outputs)):
            banned = _banned_words(getattr(s, "bad_words_token_ids", None), out, vocab_size)
            rows += [i] * len(banned)
            cols += banned
        allowed_rows, allowed_ids = [], []
        for i, p in enumerate(params):
            ids = [t for t in p.allowed_token_ids or () if t < vocab_size]
            allowed_rows += [i] * len(ids)
            allowed_ids += ids
        bias_rows, bias_ids, bias_values = [], [], []
        for i, p in enumerate(params):
            for token, bias in (p.logit_bias or {}).items():
                if token < vocab_size:  # the engine refuses others; a duck-typed row may not have been checked
                    bias_rows.append(i)
                    bias_ids.append(token)
                    bias_values.append(float(bias))
        seeds = [None if p.seed is None else _step_seed(p.seed, len(out)) for p, out in zip(params, outputs)]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=col([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            greedy=col(greedy, torch.bool),
            all_greedy=all(greedy),
            top_k=opt(top_k, vocab_size, torch.int64),
            max_top_k=max((k for k, g in zip(top_k, greedy) if not g), default=vocab_size),
            top_p=opt(top_p, 1.0),
            min_p=opt(min_p, 0.0),
            repetition_penalty=col(rep, torch.float32) if any_rep else None,
            presence_penalty=col(presence, torch.float32) if any_out_pen else None,
            frequency_penalty=col(freq, torch.float32) if any_out_pen else None,
            prompt_tokens=_flat_pairs([_prompt_array(seqs[i]) for i in rep_rows], rep_rows, device) if rep_rows else None,
            output_tokens=_flat_pairs([outputs[i] for i in pen_rows], pen_rows, device) if pen_rows else None,
            stop_mask_index=(col(rows, torch.int64), col(cols, torch.int64)) if rows else None,
            allowed_index=(col(allowed_rows, torch.int64), col(allowed_ids, torch.int64)) if allowed_rows else None,
            logit_bias=(col(bias_rows, torch.int64), col(bias_ids, torch.int64), col(bias_values, torch.float32))
            if bias_rows else None,
            step_seeds=seeds,
            max_num_logprobs=max(logprobs) if logprobs else None,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32, of the sampled token
    top_logprobs: torch.Tensor | None = None  # [B, max_num_logprobs] float32, descending
    top_token_ids: torch.Tensor | None = None  # [B, max_num_logprobs] int64
    ranks: torch.Tensor | None = None  # [B] int64: 1 + tokens more likely than the sampled one
    # the step's prompt logprobs (the model runner's, fusecc/runtime/prompt_logprobs.py), None when no
    # scheduled request asked; a step that only computes those has B = 0
    prompt_logprobs: PromptLogprobs | None = None


class Sampler:
    def __init__(self, seed: int | None = None, logprobs_mode: str = "raw") -> None:
        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"Sampler logprobs_mode must be 'processed' or 'raw', got {logprobs_mode!r}")
        self.seed = seed
        self.logprobs_mode = logprobs_mode
        self._generators: dict[torch.device, torch.Generator] = {}  # rows without their own seed

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == md.temperature.shape[0], (logits.shape, md.temperature.shape)
        if md.plain_greedy:  # the same tokens as below: penalize would only copy to float32 (exact)
            return SamplerOutput(token_ids=logits.argmax(dim=-1))
        raw = logits
        logits = self.penalize(logits, md)
        greedy_tokens = logits.argmax(dim=-1)
        if md.all_greedy:
            token_ids, processed = greedy_tokens, logits
        else:
            processed = self.truncate(logits, md)
            sampled = self.sample(processed.softmax(dim=-1), md)
            token_ids = torch.where(md.greedy, greedy_tokens, sampled)
        out = SamplerOutput(token_ids=token_ids)
        if md.max_num_logprobs is not None:
            self.add_logprobs(out, raw, logits, processed, md)
        return out

    def add_logprobs(self, out: SamplerOutput, raw: torch.Tensor, penalized: torch.Tensor,
                     processed: torch.Tensor, md: SamplingMetadata) -> None:
        """Fill out.logprobs / ranks / top_* for out.token_ids (see logprobs_mode). raw: the
        model's logits; penalized: after steps 0-2; processed: after step 4 (penalized when all greedy)."""
        if self.logprobs_mode == "raw":
            source = raw.float()
        elif md.all_greedy:
            source = processed
        else:  # greedy rows: the penalised logits, uncut, at temperature 1
            source = torch.where(md.greedy[:, None], penalized, processed)
        lp = source.log_softmax(dim=-1)
        out.logprobs = lp.gather(1, out.token_ids[:, None]).squeeze(1)
        out.ranks = (lp > out.logprobs[:, None]).sum(dim=-1) + 1
        if md.max_num_logprobs > 0:
            out.top_logprobs, out.top_token_ids = lp.topk(md.max_num_logprobs, dim=-1)

    @staticmethod
    def penalize(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Steps 0-2 on a float32 copy: logit_bias, min_tokens stop masking, then the penalties."""
        logits = logits.to(torch.float32, copy=True)  # [B, V]; never modify the runner's tensor
        B, V = logits.shape
        if md.logit_bias is not None:
            rows, ids, values = md.logit_bias
            logits.index_put_((rows, ids), values, accumulate=True)
        if md.allowed_index is not None:
            keep = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
            keep[md.allowed_index] = True
            restricted = keep.any(dim=-1, keepdim=True)  # rows without allowed_token_ids keep everything
            logits = logits.masked_fill(restricted & ~keep, float("-inf"))
        if md.stop_mask_index is not None:
            logits[md.stop_mask_index] = float("-inf")
        if md.repetition_penalty is not None:
            seen = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
            seen[md.prompt_tokens] = True
            seen[md.output_tokens] = True
            pen = md.repetition_penalty[:, None]
            penalised = torch.where(logits > 0, logits / pen, logits * pen)
            logits = torch.where(seen, penalised, logits)
        if md.presence_penalty is not None:
            counts = torch.zeros(B, V, dtype=torch.float32, device=logits.device)
            rows, ids = md.output_tokens
            counts.index_put_((rows, ids), torch.ones(ids.shape, dtype=torch.float32, device=logits.device),
                              accumulate=True)
            logits = logits - md.frequency_penalty[:, None] * counts - md.presence_penalty[:, None] * (counts > 0)
        return logits

    @staticmethod
    def truncate(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Step 4: temperature, min_p, top_k, top_p. Cut tokens get -inf."""
        logits = logits / md.temperature[:, None]
        if md.min_p is not None:
            probs = logits.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * md.min_p[:, None]
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if md.top_k is None and md.top_p is None:
            return logits
        if md.top_k is not None and md.max_top_k <= TOPK_FAST_MAX:
            candidates = Sampler._top_k_top_p_candidates(logits, md)
            if candidates is not None:
                return candidates
        sorted_logits, order = logits.sort(dim=-1, descending=False)  # [B, V] ascending
        V = logits.shape[-1]
        if md.top_k is not None:
            kth = sorted_logits.gather(1, (V - md.top_k)[:, None])  # k-th largest value
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if md.top_p is not None:
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            cut = cum <= (1.0 - md.top_p[:, None])  # the low tail holding at most 1 - p of the mass
            cut[:, -1] = False  # the most likely token always stays
            sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)

    @staticmethod
    def _top_k_top_p_candidates(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor | None:
        """top_k then top_p when every row's k <= md.max_top_k: work on the top candidates only.
        None when a sampled row ties at its k-th value past the K candidates: keeping only some
        of the ties would make the row's tokens depend on the batch's largest k (its seed must
        give the same tokens in any batch), so the caller sorts the whole vocabulary instead."""
        values, index = logits.topk(md.max_top_k, dim=-1)  # [B, K] descending
        # Greedy rows (k = V) are replaced by their argmax later; any k works for them.
        kth = values.gather(1, (md.top_k.clamp(max=md.max_top_k) - 1)[:, None])
        kept = (logits >= kth).sum(dim=-1)
        if bool(((kept > md.max_top_k) & ~md.greedy).any()):
            return None
        values = values.masked_fill(values < kth, float("-inf"))
        if md.top_p is not None:
            # All the mass left is among the candidates: keep a token while the mass before it is < p.
            probs = values.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            values = values.masked_fill(mass_before >= md.top_p[:, None], float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter_(1, index, values)

    def sample(self, probs: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """argmax(probs / q) with q ~ Exp(1) i.i.d. draws token i with probability probs[i]."""
        q = torch.empty_like(probs)
        q.exponential_(generator=self._generator(probs.device))
        for row, seed in enumerate(md.step_seeds):
            if seed is not None:
                gen = torch.Generator(device=probs.device).manual_seed(seed)
                q[row].exponential_(generator=gen)
        # q == 0 has probability ~2^-24 per draw; it would turn a cut token (0/0) into a winner.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        return probs.div(q).argmax(dim=-1)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None  # torch's default generator
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


# (batch size, device) -> the constant temperature / greedy columns of a plain-greedy step: made once,
# not as two fill kernels every decode step (nothing writes them; the plain path reads only shapes)
_PLAIN_GREEDY: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _plain_greedy_columns(B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    columns = _PLAIN_GREEDY.get((B, device))
    if columns is None:
        columns = _PLAIN_GREEDY[(B, device)] = (torch.ones(B, device=device),
                                                torch.ones(B, dtype=torch.bool, device=device))
    return columns


def is_plain_greedy(seq, params) -> bool:
    return (params.is_greedy and params.logprobs is None and not params.logit_bias
            and params.allowed_token_ids is None and not getattr(seq, "bad_words_token_ids", None)
            and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
            and (params.min_tokens == 0 or len(seq.output_token_ids) >= params.min_tokens))


def _banned_words(words: list[list[int]] | None, output: list[int], vocab_size: int) -> list[int]:
    """Last tokens of the bad words whose other tokens end `output` (vLLM's bad-words rule)."""
    banned = set()
    for word in words or ():
        prefix = word[:-1]
        if word[-1] < vocab_size and (not prefix or output[len(output) - len(prefix):] == prefix):
            banned.add(word[-1])
    return sorted(banned)


def _step_seed(seed: int, step: int) -> int:
    # A fixed 64-bit mix of (seed, step): distinct steps get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93 & _MASK64) >> 1  # manual_seed takes < 2^63


def _prompt_array(seq) -> array:
    cached = getattr(seq, "prompt_token_array", None)  # Sequence caches it; duck-typed rows may not
    return cached if cached is not None else array("q", seq.prompt_token_ids)


def _flat_pairs(token_lists: list, rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    # array('q') converts int lists in C, ~5x faster than torch.tensor on nested lists; prompts
    # come pre-converted (Sequence.prompt_token_array), so only the outputs are converted per step.
    flat, row_ids = array("q"), array("q")
    for row, tokens in zip(rows, token_lists):
        flat.extend(tokens)
        row_ids.extend(array("q", [row]) * len(tokens))
    if not flat:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.int64, device=device)
    return (torch.frombuffer(row_ids, dtype=torch.int64).to(device, non_blocking=True),
            torch.frombuffer(flat, dtype=torch.int64).to(device, non_blocking=True))
