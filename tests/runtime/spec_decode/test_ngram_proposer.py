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
