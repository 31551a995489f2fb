"""Pearson's chi-square goodness of fit, without scipy (torch's regularized incomplete gamma)."""

import torch


def chi_square_p_value(counts, probs) -> float:
    """p-value of observed `counts` against expected probabilities `probs` (categories with
    probability 0 must have count 0; they add no degree of freedom)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    probs = torch.as_tensor(probs, dtype=torch.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, "a category of probability 0 was observed"
    n = counts.sum()
    expected = n * probs[support]
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def pooled_p_value(groups) -> float:
    """One chi-square over several independent (counts, probs) groups: statistics and degrees of freedom add."""
    stat, df = torch.tensor(0.0, dtype=torch.float64), 0
    for counts, probs in groups:
        counts = torch.as_tensor(counts, dtype=torch.float64)
        probs = torch.as_tensor(probs, dtype=torch.float64)
        support = probs > 0
        assert counts[~support].sum() == 0, "a category of probability 0 was observed"
        n = counts.sum()
        if n == 0:
            continue
        expected = n * probs[support]
        stat = stat + ((counts[support] - expected) ** 2 / expected).sum()
        df += int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))
