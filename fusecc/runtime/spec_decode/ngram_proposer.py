"""Prompt lookup (n-gram) proposals: continue the sequence the way it continued before.

    NgramProposer(k=4, max_n=4, min_n=1).propose(token_ids, k)   # -> up to k token ids, maybe []

The longest suffix of the tokens (max_n down to min_n tokens) that also occurs earlier is looked
up; the k tokens that followed its most recent earlier occurrence with k tokens after it are the
proposal (else those after its first occurrence: fewer than k; vLLM takes the first occurrence).
Rewriting, summarizing or editing a text the prompt holds repeats long spans of it, which is where
this proposes well; it costs no forward pass.

Cost: one scan of the last `window` tokens per n (numpy compares), so a step costs
O(batch x max_n x window) host work, bounded whatever the sequence length.
"""

from __future__ import annotations

import numpy as np

# Tokens searched back from the end: bounds the host work per sequence and step.
SEARCH_WINDOW = 4096


class NgramProposer:
    def __init__(self, max_n: int, min_n: int) -> None:
        assert 1 <= min_n <= max_n, (min_n, max_n)
        self.max_n, self.min_n = max_n, min_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        if k <= 0 or len(token_ids) < self.min_n + 1:
            return []
        tokens = np.asarray(token_ids[-SEARCH_WINDOW:], dtype=np.int64)
        L = len(tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            suffix = tokens[L - n:]
            # windows starting at 0..L-n-1 (the suffix itself excluded) equal to the suffix
            match = np.ones(L - n, dtype=bool)
            for i in range(n):
                match &= tokens[i:L - n + i] == suffix[i]
            starts = np.flatnonzero(match)
            if len(starts):
                # the most recent occurrence followed by k tokens, else the one followed by most
                full = starts[starts + n + k <= L]
                follow = (full[-1] if len(full) else starts[0]) + n
                return tokens[follow:follow + k].tolist()
        return []
