"""The rejection sampler against the target distribution (float64 references, chi-square), on
synthetic target logits and draft distributions: one-hot drafts (n-gram), drafts sampled from
another distribution (draft models, layer skip), SamplingParams' truncation, greedy, seeds."""

import pytest
import torch

from fusecc.runtime.sampler import Sampler
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.sequence import Sequence
from fusecc.runtime.spec_decode.rejection_sampler import DraftGroup, RejectionSampler
from tests.runtime.spec_decode.stats import chi_square_p_value

V = 6
N = 4000  # windows per test: a p-value below 1e-3 flags a wrong distribution, a right one fails 1 run in 1000


def _target(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    """float64 reference of the Sampler's processing: temperature, then top_k, then top_p."""
    x = logits.double() / params.temperature
    if params.top_k > 0:
        kth = x.topk(params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    p = x.softmax(-1)
    if params.top_p < 1:
        order = p.argsort(descending=True)
        mass_before = p[order].cumsum(0) - p[order]
        cut = order[mass_before >= params.top_p]
        p[cut] = 0
        p = p / p.sum()
    return p


def _run(params, row_logits, drafts_of, draft_probs=None, seed=0):
    """N windows of one sequence each; row j of every window gets row_logits[j]."""
    groups = []
    for i in range(N):
        seq = Sequence(f"r{i}", [1, 2, 3], params)
        groups.append(DraftGroup(seq, drafts_of(i), draft_probs))
    k = len(groups[0].drafts)
    logits = row_logits[:k + 1].repeat(N, 1)
    out = RejectionSampler(Sampler(seed=seed))(logits, groups)
    tokens = out.token_ids.view(N, k + 1)
    accepted = out.accepted.view(N, k + 1)
    return tokens, accepted


def _kept(tokens, accepted):
    """Per window the kept run: leading accepted drafts then the first rejecting (or bonus) row's token."""
    runs = []
    for t, a in zip(tokens.tolist(), accepted.tolist()):
        n = 0
        while n < len(a) - 1 and a[n]:
            n += 1
        runs.append(t[:n + 1])
    return runs


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4),
                                    SamplingParams(temperature=1.3, top_p=0.8)], ids=["plain", "top_k", "top_p"])
def test_one_hot_drafts_keep_the_target_distribution(params):
    g = torch.Generator().manual_seed(1)
    row_logits = torch.randn(3, V, generator=g) * 1.5
    # n-gram: deterministic drafts, the likeliest and a less likely token, so both paths run
    tokens, accepted = _run(params, row_logits, lambda i: [int(row_logits[0].argmax()) if i % 2 else 1, 2])
    runs = _kept(tokens, accepted)
    first = torch.bincount(torch.tensor([r[0] for r in runs]), minlength=V)
    assert chi_square_p_value(first, _target(params, row_logits[0])) > 1e-3
    # the second token, where the first draft was accepted, follows row 1's distribution
    second = torch.bincount(torch.tensor([r[1] for r in runs if len(r) > 1]), minlength=V)
    assert second.sum() > 500
    assert chi_square_p_value(second, _target(params, row_logits[1])) > 1e-3


def test_sampled_drafts_keep_the_target_distribution():
    """Drafts drawn from another distribution q (a draft model): accepted with min(1, p/q), else max(p - q, 0)."""
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(2)
    row_logits = torch.randn(3, V, generator=g)
    q = torch.randn(2, V, generator=g).softmax(-1)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(2)], 1).tolist()
    tokens, accepted = _run(params, row_logits, lambda i: drafts[i], draft_probs=q)
    runs = _kept(tokens, accepted)
    first = torch.bincount(torch.tensor([r[0] for r in runs]), minlength=V)
    assert chi_square_p_value(first, _target(params, row_logits[0])) > 1e-3
    second = torch.bincount(torch.tensor([r[1] for r in runs if len(r) > 1]), minlength=V)
    assert chi_square_p_value(second, _target(params, row_logits[1])) > 1e-3
    # acceptance probability of the first draft: sum_x min(p(x), q(x))
    p0 = _target(params, row_logits[0])
    expected_rate = torch.minimum(p0, q[0].double()).sum()
    rate = accepted[:, 0].double().mean()
    assert abs(rate - expected_rate) < 4 * (expected_rate * (1 - expected_rate) / N) ** 0.5


def test_a_wrong_draft_distribution_is_detected():
    """The test's power: drafts drawn from one distribution but verified as if drawn from another
    (uniform) skew the kept tokens."""
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(3)
    row_logits = torch.randn(2, V, generator=g)
    actual = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.9])
    drafts = torch.multinomial(actual, N, replacement=True, generator=g).tolist()
    claimed = torch.full((1, V), 1.0 / V)
    tokens, accepted = _run(params, row_logits, lambda i: [drafts[i]], draft_probs=claimed)
    first = torch.bincount(torch.tensor([r[0] for r in _kept(tokens, accepted)]), minlength=V)
    assert chi_square_p_value(first, _target(params, row_logits[0])) < 1e-3


def test_greedy_rows_keep_the_argmax_and_accept_only_it():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, V, generator=g)
    best = logits.argmax(-1).tolist()
    seq = Sequence("g", [1, 2], SamplingParams(temperature=0))
    out = RejectionSampler(Sampler(seed=0))(logits, [DraftGroup(seq, [best[0], best[1], (best[2] + 1) % V])])
    assert out.token_ids.tolist() == best
    assert out.accepted.tolist() == [True, True, False, False]


def test_seeded_rows_are_reproducible_in_any_batch():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=g)
    params = SamplingParams(temperature=1.0, seed=7)

    def run(batch_noise: int):
        other = [DraftGroup(Sequence(f"o{i}", [1], SamplingParams(temperature=1.0)), [0, 1]) for i in range(batch_noise)]
        group = DraftGroup(Sequence("s", [1, 2], params), [2, 3])
        all_logits = torch.cat([torch.randn(3 * batch_noise, V, generator=g), logits])
        out = RejectionSampler(Sampler(seed=None))(all_logits, other + [group])
        return out.token_ids[-3:].tolist(), out.accepted[-3:].tolist()

    assert run(0) == run(3) == run(5)
