"""Prompt lookup proposals, worked out by hand."""

from fusecc.runtime.spec_decode.ngram_proposer import NgramProposer


def test_longest_suffix_first_then_what_followed_it():
    p = NgramProposer(max_n=3, min_n=1)
    # [4, 2, 3] never occurred before; [2, 3] did, at 1, followed by 4 2 3 (only 3 tokens: fewer than k)
    assert p.propose([1, 2, 3, 4, 2, 3], k=4) == [4, 2, 3]
    # the most recent occurrence followed by k tokens: [7, 8] at 0 and 3; at 3 it has 9 5 after it
    assert p.propose([7, 8, 1, 7, 8, 9, 5, 6, 7, 8], k=2) == [9, 5]
    assert p.propose([1, 2, 3], k=2) == []  # no suffix occurs earlier
    assert p.propose([5, 5], k=0) == []


def test_min_n_bounds_the_match_length():
    assert NgramProposer(max_n=3, min_n=2).propose([1, 9, 4, 2, 1], k=2) == []  # only [1] repeats
    assert NgramProposer(max_n=3, min_n=1).propose([1, 9, 4, 2, 1], k=2) == [9, 4]


def scan_every_n(token_ids: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The rule as the module docstring states it, by brute force: for n = max_n down to min_n, the
    earlier windows equal to the last n tokens; the most recent one followed by k tokens, else the first."""
    L = len(token_ids)
    if k <= 0 or L < min_n + 1:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        starts = [s for s in range(L - n) if token_ids[s:s + n] == token_ids[L - n:]]
        if starts:
            full = [s for s in starts if s + n + k <= L]
            follow = (full[-1] if full else starts[0]) + n
            return token_ids[follow:follow + k]
    return []


def test_matches_a_brute_force_scan_on_random_sequences():
    import random

    rng = random.Random(0)
    for trial in range(3000):
        vocab = rng.choice([2, 3, 5, 40])  # small vocabularies: many partial and overlapping matches
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        max_n = rng.randrange(1, 6)
        min_n = rng.randrange(1, max_n + 1)
        k = rng.randrange(0, 6)
        got = NgramProposer(max_n, min_n).propose(tokens, k)
        assert got == scan_every_n(tokens, k, max_n, min_n), (tokens, k, max_n, min_n)
