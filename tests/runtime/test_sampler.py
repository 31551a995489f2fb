"""Sampler against a straightforward per-row float64 reference, plus statistical checks."""

import math
import re
from dataclasses import dataclass, field

import pytest
import torch

from fusecc.runtime.sampler import Sampler, SamplingMetadata
from fusecc.runtime.sampling_params import SamplingParams

V = 12
EOS = 3
NEG = float("-inf")


@dataclass
class Row:  # what SamplingMetadata.build reads from a sequence
    sampling_params: SamplingParams
    prompt_token_ids: list = field(default_factory=lambda: [1, 2])
    output_token_ids: list = field(default_factory=list)


def reference(logits, row, eos=(EOS,)):
    """One row, float64, loops: returns (penalised logits, logits sampled from)."""
    p = row.sampling_params
    x = [float(v) for v in logits]
    for t, bias in (p.logit_bias or {}).items():
        x[t] += bias
    if len(row.output_token_ids) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = NEG
    for t in set(row.prompt_token_ids) | set(row.output_token_ids):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(row.output_token_ids):
        x[t] -= p.frequency_penalty * row.output_token_ids.count(t) + p.presence_penalty
    if p.temperature < 1e-5:
        return x, list(x)
    y = [v / p.temperature for v in x]

    def softmax(z):
        m = max(z)
        e = [math.exp(v - m) if v != NEG else 0.0 for v in z]
        return [v / sum(e) for v in e]

    if p.min_p > 0:
        pr = softmax(y)
        y = [NEG if pr[i] < p.min_p * max(pr) else y[i] for i in range(V)]
    if p.top_k > 0:
        kth = sorted(y, reverse=True)[p.top_k - 1]
        y = [v if v >= kth else NEG for v in y]
    if p.top_p < 1:
        pr = softmax(y)
        mass_before = 0.0
        for i in sorted(range(V), key=lambda i: -pr[i]):
            if mass_before >= p.top_p:
                y[i] = NEG
            mass_before += pr[i]
    return x, y


def build(rows, eos=(EOS,)):
    return SamplingMetadata.build(rows, vocab_size=V, device="cpu", eos_token_ids=eos)


def assert_same_logits(actual, expected):
    actual = actual.tolist()
    assert [a == NEG for a in actual] == [e == NEG for e in expected]
    for a, e in zip(actual, expected):
        if e != NEG:
            assert a == pytest.approx(e, rel=1e-5, abs=1e-5)


ROWS = [
    Row(SamplingParams(temperature=0)),
    Row(SamplingParams(temperature=0.7, top_k=4)),
    Row(SamplingParams(temperature=1.3, top_p=0.6)),
    Row(SamplingParams(temperature=0.9, min_p=0.2)),
    Row(SamplingParams(temperature=1.0, top_k=6, top_p=0.8, min_p=0.05)),
    Row(SamplingParams(temperature=0, repetition_penalty=1.5), [1, 2, 5], [5, 7]),
    Row(SamplingParams(temperature=0.8, presence_penalty=0.7, frequency_penalty=0.4), [4], [6, 6, 6, 9]),
    Row(SamplingParams(temperature=0.5, repetition_penalty=0.8, frequency_penalty=-0.5, top_k=5), [0, 8], [8, 2, 2]),
    Row(SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[10]), [1], [4]),
    Row(SamplingParams(temperature=1.0, min_tokens=2, ignore_eos=True), [1], [4]),
    Row(SamplingParams(temperature=0, logit_bias={0: 100.0, 4: -2.5})),
    Row(SamplingParams(temperature=0.8, logit_bias={7: 3.0, 2: -100}, repetition_penalty=1.3, top_k=5), [2], [7]),
]


def test_processing_matches_the_per_row_reference():
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), V) * 3
    md = build(ROWS)
    penalised = Sampler.penalize(logits, md)
    processed = Sampler.truncate(penalised, md)
    for i, row in enumerate(ROWS):
        ref_pen, ref_proc = reference(logits[i].tolist(), row)
        assert_same_logits(penalised[i], ref_pen)
        if not row.sampling_params.is_greedy:
            assert_same_logits(processed[i], ref_proc)


def test_greedy_rows_are_exact_argmax_of_penalised_logits():
    torch.manual_seed(1)
    rows = [Row(SamplingParams(temperature=0, repetition_penalty=r), [1, 2, 3], [4]) for r in (1.0, 1.2, 2.0)]
    rows += [Row(SamplingParams(temperature=0.9))]  # a sampled row in the batch changes nothing for greedy rows
    for _ in range(20):
        logits = torch.randn(len(rows), V)
        out = Sampler(seed=0)(logits, build(rows))
        for i, row in enumerate(rows[:3]):
            pen, _ = reference(logits[i].tolist(), row)
            assert out.token_ids[i].item() == max(range(V), key=lambda t: (pen[t], -t))


def test_logits_input_is_not_modified():
    logits = torch.randn(len(ROWS), V)
    before = logits.clone()
    Sampler(seed=0)(logits, build(ROWS))
    assert torch.equal(logits, before)


def empirical(params, logits_row, n=40000, seed=0):
    rows = [Row(params)] * n
    out = Sampler(seed=seed)(logits_row.expand(n, V).contiguous(), build(rows))
    return torch.bincount(out.token_ids, minlength=V).double() / n


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=3),
    SamplingParams(temperature=1.5, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.1),
])
def test_sample_frequencies_match_the_reference_distribution(params):
    torch.manual_seed(2)
    logits_row = torch.randn(V) * 1.5
    _, y = reference(logits_row.tolist(), Row(params))
    expected = torch.tensor(y, dtype=torch.float64).softmax(-1)
    freq = empirical(params, logits_row)
    assert (freq[expected == 0] == 0).all()  # cut tokens are never drawn
    # 40000 draws: the standard error of a frequency is <= 0.0025; allow ~4 sigma.
    assert (freq - expected).abs().max().item() < 0.01


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(64, V)
    logits[:, EOS] = 20.0
    logits[:, 10] = 20.0
    rows = [Row(SamplingParams(min_tokens=3, stop_token_ids=[10]), [1], [5, 6])] * 64
    toks = Sampler(seed=0)(logits, build(rows)).token_ids
    assert not ((toks == EOS) | (toks == 10)).any()
    rows = [Row(SamplingParams(min_tokens=2, stop_token_ids=[10]), [1], [5, 6])] * 64  # reached
    toks = Sampler(seed=0)(logits, build(rows)).token_ids
    assert ((toks == EOS) | (toks == 10)).all()


def test_per_request_seed_is_independent_of_the_batch():
    torch.manual_seed(3)
    logits_row = torch.randn(V)
    seeded = Row(SamplingParams(temperature=1.0, seed=1234), [1], [])

    def draw(batch_before, sampler_seed, outputs=()):
        row = Row(seeded.sampling_params, [1], list(outputs))
        rows = [Row(SamplingParams(temperature=1.0))] * batch_before + [row]
        logits = torch.cat([torch.randn(batch_before, V), logits_row[None]])
        return Sampler(seed=sampler_seed)(logits, build(rows)).token_ids[-1].item()

    first = [draw(0, 0, [0] * k) for k in range(30)]
    assert first == [draw(5, 99, [0] * k) for k in range(30)]
    assert first == [draw(2, None, [0] * k) for k in range(30)]
    # The step index changes the stream: 30 steps of a 12-way distribution are not all one token.
    assert len(set(first)) > 1
    other = Row(SamplingParams(temperature=1.0, seed=1235), [1], [])
    assert [Sampler()(logits_row[None], build([Row(other.sampling_params, [1], [0] * k)])).token_ids.item()
            for k in range(30)] != first


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.randn(16, V)
    rows = [Row(SamplingParams(temperature=1.0))] * 16
    a = Sampler(seed=5)(logits, build(rows)).token_ids
    b = Sampler(seed=5)(logits, build(rows)).token_ids
    assert torch.equal(a, b)


@pytest.mark.parametrize("third_top_k", [-1, 5])  # full sort / top-k candidates path
def test_logprobs_processed_and_raw(third_top_k):
    torch.manual_seed(4)
    logits = torch.randn(3, V) * 2
    rows = [Row(SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.3), [1, 2], [2]),
            Row(SamplingParams(temperature=0.5, top_k=4, logprobs=2)),
            Row(SamplingParams(temperature=1.0, top_k=third_top_k, logprobs=0))]
    md = build(rows)
    out = Sampler(seed=0, logprobs_mode="processed")(logits, md)
    assert out.top_logprobs.shape == (3, 3)
    for i, row in enumerate(rows):
        _, y = reference(logits[i].tolist(), row)
        lp = torch.tensor(y, dtype=torch.float64).log_softmax(-1)
        tok = out.token_ids[i].item()
        assert out.logprobs[i].item() == pytest.approx(lp[tok].item(), abs=1e-5)
        assert lp[tok].item() > NEG  # never a cut token
        top = lp.topk(3)
        assert out.top_logprobs[i].tolist() == pytest.approx(top.values.tolist(), abs=1e-5)
    raw = Sampler(seed=0)(logits, md)  # raw is the default, as in vLLM
    ref_raw = logits.double().log_softmax(-1)
    assert torch.allclose(raw.logprobs.double(), ref_raw.gather(1, raw.token_ids[:, None]).squeeze(1), atol=1e-5)
    assert Sampler()(logits, build([Row(SamplingParams())] * 3)).logprobs is None


@pytest.mark.gpu
def test_gpu_matches_cpu_for_greedy_and_penalties():
    torch.manual_seed(5)
    logits = torch.randn(len(ROWS), V) * 3
    md_cpu, md_gpu = build(ROWS), SamplingMetadata.build(ROWS, V, "cuda", [EOS])
    pen_cpu = Sampler.truncate(Sampler.penalize(logits, md_cpu), md_cpu)
    pen_gpu = Sampler.truncate(Sampler.penalize(logits.cuda(), md_gpu), md_gpu)
    pen_gpu = pen_gpu.cpu()
    assert torch.equal(pen_cpu.isinf(), pen_gpu.isinf())
    finite = ~pen_cpu.isinf()
    assert torch.allclose(pen_cpu[finite], pen_gpu[finite], atol=1e-5)
    out = Sampler(seed=0)(logits.cuda(), md_gpu)
    assert out.token_ids.device.type == "cuda"
    assert out.token_ids[0].item() == Sampler(seed=0)(logits, md_cpu).token_ids[0].item()


def test_top_k_fast_path_matches_the_reference():
    # Every row has top_k set, so only the top max-k candidates are sorted.
    torch.manual_seed(6)
    rows = [Row(SamplingParams(temperature=0.7, top_k=4)),
            Row(SamplingParams(temperature=1.2, top_k=7, top_p=0.5)),
            Row(SamplingParams(temperature=1.0, top_k=1)),
            Row(SamplingParams(temperature=0.9, top_k=12, top_p=0.9, min_p=0.05)),
            Row(SamplingParams(temperature=0)),
            Row(SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.4), [1, 2], [3, 3])]
    md = build(rows)
    assert md.max_top_k == 12  # greedy rows do not count
    for _ in range(10):
        logits = torch.randn(len(rows), V) * 3
        processed = Sampler.truncate(Sampler.penalize(logits, md), md)
        for i, row in enumerate(rows):
            if not row.sampling_params.is_greedy:
                assert_same_logits(processed[i], reference(logits[i].tolist(), row)[1])
        out = Sampler(seed=0)(logits, md)
        assert out.token_ids[4].item() == max(range(V), key=lambda t: (logits[4, t].item(), -t))


def test_sequences_and_plain_rows_give_the_same_penalties():
    from fusecc.runtime.sequence import Sequence

    params = SamplingParams(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2)
    seq = Sequence("s", [1, 4, 4, 9], params)
    for t in (4, 7, 7):
        seq.append_token(t)
    row = Row(params, [1, 4, 4, 9], [4, 7, 7])
    logits = torch.randn(2, V)
    penalised = Sampler.penalize(logits, build([seq, row]))
    assert_same_logits(penalised[0], reference(logits[0].tolist(), row)[0])
    assert_same_logits(penalised[1], reference(logits[1].tolist(), row)[0])


@pytest.mark.parametrize("params,outputs,plain", [
    (SamplingParams(temperature=0), [], True),
    (SamplingParams(temperature=0, seed=5, top_k=3, top_p=0.5, min_p=0.1), [], True),  # filters off when greedy
    (SamplingParams(temperature=0, min_tokens=2), [4, 5], True),  # min_tokens already reached
    (SamplingParams(temperature=0, min_tokens=2), [4], False),  # EOS still masked
    (SamplingParams(temperature=0, repetition_penalty=1.2), [], False),
    (SamplingParams(temperature=0, presence_penalty=0.5), [], False),
    (SamplingParams(temperature=0, frequency_penalty=0.5), [], False),
    (SamplingParams(temperature=0, logprobs=0), [], False),
    (SamplingParams(temperature=0, logit_bias={1: 5.0}), [], False),
    (SamplingParams(temperature=0.5), [], False),
])
def test_plain_greedy_fast_path_only_when_nothing_applies_before_argmax(params, outputs, plain):
    rows = [Row(SamplingParams(temperature=0)), Row(params, [1, 2], outputs)]
    md = build(rows)
    assert md.plain_greedy == plain and (md.all_greedy or not plain)


def test_plain_greedy_fast_path_gives_the_general_paths_tokens():
    torch.manual_seed(2)
    rows = [Row(SamplingParams(temperature=0)) for _ in range(8)]
    md = build(rows)
    assert md.plain_greedy
    general = build(rows)
    general.plain_greedy = False
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(8, V).to(dtype)
        logits[3, 5] = logits[3, 7] = logits[3].max() + 1  # a tie: the first index wins in both paths
        fast, slow = Sampler(seed=0)(logits, md), Sampler(seed=0)(logits, general)
        assert fast.token_ids.tolist() == slow.token_ids.tolist()
        assert fast.token_ids[3].item() == 5 and fast.logprobs is None


def test_logit_bias_forces_and_bans_tokens():
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    rows = [Row(SamplingParams(temperature=0, logit_bias={9: 100})),
            Row(SamplingParams(temperature=0, logit_bias={int(logits[1].argmax()): -100})),
            Row(SamplingParams(temperature=0.7, seed=1, logit_bias={t: -100 for t in range(V) if t != 6}))]
    out = Sampler(seed=0)(logits, build(rows))
    assert out.token_ids[0].item() == 9
    assert out.token_ids[1].item() == int(logits[1].topk(2).indices[1])  # the runner-up
    assert out.token_ids[2].item() == 6


@pytest.mark.parametrize("bias,message", [
    ({-1: 1.0}, "keys must be non-negative token ids"),
    ({"5": 1.0}, "keys must be non-negative token ids"),
    ({5: 100.5}, "values must be numbers in [-100, 100]"),
    ({5: float("nan")}, "values must be numbers in [-100, 100]"),
    ({5: True}, "values must be numbers in [-100, 100]"),
    ([(5, 1.0)], "must be None or a dict"),
])
def test_logit_bias_validation(bias, message):
    with pytest.raises(ValueError, match=r"SamplingParams\.logit_bias .*" + re.escape(message)):
        SamplingParams(logit_bias=bias)


def test_seeded_top_k_with_ties_does_not_depend_on_the_batch():
    # tokens 1, 2, 3 tie at the 2nd-largest value: all ties are kept whatever the batch's largest k
    row = torch.full((V,), -10.0)
    row[:4] = torch.tensor([2.0, 1.0, 1.0, 1.0])
    for seed in range(60):
        a = Row(SamplingParams(temperature=1.0, top_k=2, seed=seed))
        b = Row(SamplingParams(temperature=1.0, top_k=8, seed=seed + 1000))
        alone = Sampler(seed=0)(row[None], build([a])).token_ids[0].item()
        batched = Sampler(seed=0)(torch.stack([row, torch.zeros(V)]), build([a, b])).token_ids[0].item()
        assert alone == batched, seed
