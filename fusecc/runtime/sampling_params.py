"""Per-request sampling options, with the meanings vLLM and the OpenAI API give them.

    SamplingParams(temperature=0)                           # greedy
    SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=256, stop=["\\n\\n"])

Where each option is applied:
- Sampler (fusecc/runtime/sampler.py): logit_bias, allowed_token_ids, bad_words, temperature,
  top_k, top_p, min_p, the three penalties, seed, logprobs, and min_tokens (EOS and
  stop_token_ids are masked until min_tokens are out).
- Stop checker (fusecc/runtime/stop_checker.py), after every new token: EOS (unless ignore_eos),
  stop_token_ids, stop strings (not before min_tokens are out), max_tokens, max_model_len.
- Output processor (fusecc/runtime/output_processor.py): skip_special_tokens,
  include_stop_str_in_output, logprobs and prompt_logprobs as vLLM's Logprob dicts, output_kind.
- Model runner (fusecc/runtime/prompt_logprobs.py): prompt_logprobs (logits at every prompt
  position of the requests that ask; such a request does not read the prefix cache, as in vLLM).
- Engine (add_request): n (n sequences "<id>#<i>", seeds seed + i), truncate_prompt_tokens,
  the token-id checks against the vocabulary (logit_bias, allowed_token_ids), bad_words' tokenization.

`output_kind` (engine): "cumulative" (default) reports the request after every step that gave
it a token (text and token ids so far), as a streaming server needs; "delta" reports the same
steps with only what is new since the request's previous output (vLLM's RequestOutputKind.DELTA);
"final_only" reports it once, finished, which saves the per-step output building and, without
stop strings, the incremental detokenization (the text is decoded once at the end), as offline
batch runs want.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this are greedy: dividing logits by ~0 only turns sampling into argmax
# with worse numerics.
GREEDY_EPS = 1e-5
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # the OpenAI API's range for a logit_bias value: [-100, 100]
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass
class SamplingParams:
    """How to sample one request (vLLM's names and meanings).

    n: completions per prompt (1). temperature: 0 = greedy (1.0). top_k: keep the k most likely
    tokens, -1 or 0 = off. top_p: nucleus mass in (0, 1] (1 = off). min_p: drop tokens below
    min_p x the top token's probability (0 = off). repetition_penalty (> 1 discourages tokens of
    the prompt or output), presence_penalty and frequency_penalty (in [-2, 2], OpenAI's).
    seed: per-request seed (same seed + prompt = same tokens whatever the batch). stop: strings
    that end the output (cut from it unless include_stop_str_in_output). stop_token_ids: token
    ids that end it. max_tokens (16) / min_tokens (0): output length bounds. ignore_eos: keep
    going past EOS. logit_bias: {token id: bias in [-100, 100]}. allowed_token_ids: sample only
    these. bad_words: strings whose tokenization is never generated. logprobs: return this many
    top log-probabilities per token plus the sampled one's (None = none, 0 = only the sampled).
    prompt_logprobs: the same for every prompt token but the first (None = none, 0 = only the
    prompt token's; RequestOutput.prompt_logprobs). skip_special_tokens: leave special tokens out of the
    text. truncate_prompt_tokens: keep only the last k prompt tokens. output_kind: "cumulative",
    "delta" or "final_only" (see the module docstring).
    """

    n: int = 1
    temperature: float = 1.0
    # -1 or 0 = off (all tokens).
    top_k: int = -1
    top_p: float = 1.0
    # Drop tokens whose probability is below min_p * (probability of the most likely token).
    min_p: float = 0.0
    # > 1 discourages tokens already in the prompt or the output (divides positive logits,
    # multiplies negative ones).
    repetition_penalty: float = 1.0
    # Subtracted once from the logit of every token already in the output.
    presence_penalty: float = 0.0
    # Subtracted per occurrence in the output.
    frequency_penalty: float = 0.0
    # Per-request seed: the same seed and prompt give the same tokens whatever the batch.
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # Keep the stop string that ended the output in its text (vLLM's include_stop_str_in_output).
    include_stop_str_in_output: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    # token id -> value added to its logit before anything else (OpenAI's logit_bias: -100
    # all but bans a token, 100 all but forces it). Token ids are checked against the vocabulary
    # by the engine, which knows it.
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be sampled (None = all); checked against the vocabulary by the engine.
    allowed_token_ids: list[int] | None = None
    # Words never to generate: the engine tokenizes each (as is and with a leading space, as
    # vLLM); the sampler masks a word's last token whenever the output ends with its other tokens.
    bad_words: list[str] | None = None
    # Return the log-probabilities of this many most likely tokens (plus the sampled one);
    # None = no logprobs, 0 = only the sampled token's.
    logprobs: int | None = None
    # Log-probabilities of the prompt tokens (each but the first: its list entry is None), with this
    # many top alternatives per position; None = none, 0 = only the prompt token's. Raw log_softmax
    # of the model's logits, as vLLM's.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Keep only the last k prompt tokens (-1 = the last max_model_len - 1); None = the whole prompt.
    truncate_prompt_tokens: int | None = None
    # When and what LLMEngine.step reports: "cumulative", "delta" or "final_only".
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        # Accept the OpenAI API's `stop: "str"` and None as well as lists.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, (list, tuple)) or self.stop_token_ids is None:
            self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.logit_bias, dict):  # anything else is _validate's to name
            self.logit_bias = dict(self.logit_bias) or None
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif isinstance(self.bad_words, tuple):
            self.bad_words = list(self.bad_words)
        self._validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def _validate(self) -> None:
        # types first: a string where a number belongs would fail the range checks below with
        # an error that does not name the field
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _require(_is_real(getattr(self, name)), name, getattr(self, name), "must be a number")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be True or False")
        _require(isinstance(self.stop, list), "stop", self.stop, "must be a string, a list of strings or None")
        _require(isinstance(self.stop_token_ids, list), "stop_token_ids", self.stop_token_ids,
                 "must be a list of token ids or None")
        _require(_is_int(self.n) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        _require(math.isfinite(self.temperature) and self.temperature >= 0.0, "temperature", self.temperature,
                 "must be a finite number >= 0 (0 = greedy)")  # inf turned the masked logits into NaN
        _require(_is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k,
                 "must be -1 or 0 (off) or a positive integer")
        _require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _require(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _require(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0, "repetition_penalty",
                 self.repetition_penalty, "must be a finite number > 0")
        _require(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty,
                 "must be in [-2, 2]")
        _require(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty,
                 "must be in [-2, 2]")
        _require(self.seed is None or _is_int(self.seed), "seed", self.seed, "must be an integer or None")
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
                 "must be an integer >= 1")
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens,
                 "must be an integer >= 0")
        _require(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                 f"must be <= max_tokens ({self.max_tokens})")
        _require(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"{len(self.stop)} strings",
                 f"must hold at most {MAX_STOP_STRINGS} strings")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
                 "must hold non-empty strings")
        _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 self.stop_token_ids, "must hold non-negative integers")
        _require(self.logit_bias is None or isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias,
                 "must be None or a dict of token id -> bias")
        for token, bias in (self.logit_bias or {}).items():
            _require(_is_int(token) and token >= 0, "logit_bias", token, "keys must be non-negative token ids")
            _require(isinstance(bias, (int, float)) and not isinstance(bias, bool)
                     and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "logit_bias", bias,
                     f"values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        _require(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                 "logprobs", self.logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        _require(self.allowed_token_ids is None or (isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                                                    and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)),
                 "allowed_token_ids", self.allowed_token_ids, "must be None or a non-empty list of token ids")
        _require(self.bad_words is None or (isinstance(self.bad_words, list)
                                            and all(isinstance(w, str) and w.strip() for w in self.bad_words)),
                 "bad_words", self.bad_words, "must be None or a list of non-blank strings")
        _require(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                  and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
                 "prompt_logprobs", self.prompt_logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        _require(self.truncate_prompt_tokens is None or (_is_int(self.truncate_prompt_tokens)
                                                         and (self.truncate_prompt_tokens >= 1
                                                              or self.truncate_prompt_tokens == -1)),
                 "truncate_prompt_tokens", self.truncate_prompt_tokens, "must be None, -1 or an integer >= 1")
        _require(self.output_kind in OUTPUT_KINDS, "output_kind", self.output_kind, f"must be one of {OUTPUT_KINDS}")


def _is_int(value) -> bool:
    # bool is an int subclass: top_k=True or logprobs=True would pass, then crash the engine step
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, name: str, value: object, what: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {what}, got {value!r}")
