"""The one place that decides whether a sequence stops after its newest token.

    stop = check_stop(seq, eos_token_ids, max_model_len, detok)   # after the token is appended
    if stop is not None:
        scheduler.finish(seq, stop.reason, stop.stop_reason)

In order (vLLM's StopChecker): no EOS, stop token or stop string ends a sequence before
min_tokens are out (the sampler masks EOS and stop tokens until then; a stop string could still
appear); then a stop token id (stop_reason = the id), EOS unless ignore_eos (stop_reason None),
a stop string in the new text (stop_reason = the string; the detokenizer cuts the text at it);
then the length limits, max_tokens and max_model_len (reason "length"). A token that completes
a stop string and reaches max_tokens is a "stop", as vLLM and OpenAI report it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusecc.runtime.detokenizer import IncrementalDetokenizer
    from fusecc.runtime.sequence import Sequence


@dataclass(frozen=True)
class Stop:
    reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS and length


def check_stop(seq: "Sequence", eos_token_ids: frozenset[int], max_model_len: int,
               detok: "IncrementalDetokenizer | None" = None, new_text_len: int = 0) -> Stop | None:
    """`detok` (with the newest token's text, `new_text_len` characters, already added): stop
    strings are looked for only when given, i.e. when the sequence is detokenized step by step."""
    params = seq.sampling_params
    token = seq.last_token_id
    if seq.num_output_tokens >= params.min_tokens:
        if token in params.stop_token_ids:
            return Stop("stop", token)
        if not params.ignore_eos and token in eos_token_ids:
            return Stop("stop")
        if detok is not None:
            matched = detok.check_stop(new_text_len)
            if matched is not None:
                return Stop("stop", matched)
    if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_model_len:
        return Stop("length")
    return None
