"""Prompt lookup (n-gram) proposals: continue the sequence the way it continued before.

    NgramProposer(k=4, max_n=4, min_n=1).propose(token_ids, k)   # -> up to k token ids, maybe []

The longest suffix of the tokens (max_n down to min_n tokens) that also occurs earlier is looked
up; the k tokens that followed its most recent earlier occurrence with k tokens after it are the
proposal (else those after its first occurrence: fewer than k; vLLM takes the first occurrence).
Rewriting, summarizing or editing a text the prompt holds repeats long spans of it, which is where
this proposes well; it costs no forward pass.

Cost: list.index finds where the last token occurred before, within the last SEARCH_WINDOW tokens;
only those occurrences are extended backwards (up to max_n compares each). A sequence of 400 tokens
costs a few microseconds, where a numpy scan per n and per offset took ~90 us (1.4 ms of host time
a step at batch 16), most of it converting the token list to an array.
"""

from __future__ import annotations

# Tokens searched back from the end: bounds the host work per sequence and step.
SEARCH_WINDOW = 4096


class NgramProposer:
    def __init__(self, max_n: int, min_n: int) -> None:
        assert 1 <= min_n <= max_n, (min_n, max_n)
        self.max_n, self.min_n = max_n, min_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        L = len(token_ids)
        if k <= 0 or L < self.min_n + 1:
            return []
        lo = max(0, L - SEARCH_WINDOW)
        # ends: earlier positions holding the last token (the suffix itself, ending at L - 1, excluded);
        # list.index scans in C, and a list is not copied into an array first (that alone took ~40 us)
        last, ends, i = token_ids[-1], [], lo
        try:
            while True:
                i = token_ids.index(last, i, L - 1)
                ends.append(i)
                i += 1
        except ValueError:
            pass
        if not ends:
            return []
        # extend the occurrences backwards while they still equal the suffix: those left after the
        # last extension that kept any are the occurrences of the longest suffix that occurs
        n = 1
        for back in range(1, min(self.max_n, L - lo - 1)):
            want = token_ids[L - 1 - back]
            longer = [e for e in ends if e - back >= lo and token_ids[e - back] == want]
            if not longer:
                break
            ends, n = longer, back + 1
        if n < self.min_n:
            return []
        starts = [e - n + 1 for e in ends]  # ascending
        # the most recent occurrence followed by k tokens, else the one followed by most
        full = [s for s in starts if s + n + k <= L]
        follow = (full[-1] if full else starts[0]) + n
        return token_ids[follow:follow + k]
