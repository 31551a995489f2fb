"""The stop checker: the one place that decides who stops after a new token, in vLLM's order."""

import pytest

from fusecc.runtime.byte_tokenizer import ByteTokenizer
from fusecc.runtime.detokenizer import IncrementalDetokenizer
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.sequence import Sequence
from fusecc.runtime.stop_checker import Stop, check_stop

EOS = 257


def decide(outputs: bytes | list[int], max_model_len=64, detokenize=True, **params):
    """Append `outputs` one by one as the engine does; the first decision (and the text) or None."""
    seq = Sequence("r", [256, 72], SamplingParams(**params))
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, seq.prompt_token_ids, seq.sampling_params.stop, True,
                                   seq.sampling_params.include_stop_str_in_output)
    for t in outputs:
        seq.append_token(t)
        new = detok.add_tokens([t])
        stop = check_stop(seq, frozenset({EOS}), max_model_len, detok if detokenize else None, len(new))
        if stop is not None:
            return stop, detok.text, seq.num_output_tokens
    return None, detok.text, seq.num_output_tokens


def test_eos_and_stop_token_ids():
    assert decide([97, EOS, 98])[0] == Stop("stop")
    assert decide([97, 98], stop_token_ids=[98])[0] == Stop("stop", 98)
    assert decide([97, EOS], stop_token_ids=[EOS])[0] == Stop("stop", EOS)  # the listed id is the reason
    assert decide([97, EOS, 98], ignore_eos=True)[0] is None


def test_min_tokens_holds_back_every_stop_but_length():
    assert decide([EOS, EOS, EOS], min_tokens=3) == (Stop("stop"), "", 3)
    assert decide(b"a##b##", stop=["##"], min_tokens=4) == (Stop("stop", "##"), "a##b", 6)
    assert decide(b"abcdef", max_model_len=5, min_tokens=10, max_tokens=10) == (Stop("length"), "abc", 3)


def test_a_stop_string_on_the_last_allowed_token_is_a_stop():
    assert decide(b"ab##", stop=["##"], max_tokens=4) == (Stop("stop", "##"), "ab", 4)
    assert decide(b"ab##", stop=["##"], max_tokens=4, include_stop_str_in_output=True) == \
        (Stop("stop", "##"), "ab##", 4)
    assert decide(b"abcd", stop=["##"], max_tokens=4) == (Stop("length"), "abcd", 4)


def test_stop_strings_only_where_text_is_decoded_and_max_model_len():
    assert decide(b"ab##cd", stop=["##"], max_tokens=6, detokenize=False)[0] == Stop("length")
    assert decide(b"abcdefgh", max_model_len=6)[0:3:2] == (Stop("length"), 4)  # 2 prompt + 4 outputs


@pytest.mark.parametrize("stop", [["c"], ["bc", "b"]])
def test_the_earliest_stop_string_wins(stop):
    assert decide(b"abcd", stop=stop)[1] == ("ab" if stop == ["c"] else "a")
