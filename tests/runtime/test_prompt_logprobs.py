"""SamplingParams.prompt_logprobs against transformers eager (fp32 tiny models): log_softmax of its
logits at every prompt position, through chunked prefill, preemption (mid-prompt and after it) and
a prompt whose prefix is in the cache; the top-k and ranks; each position reported exactly once."""

import pytest
import torch

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import MAX_LOGPROBS, SamplingParams
from tests.runtime.hf_checkpoints import WORDS, prompts, run_engine, save_tiny_checkpoint, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
SYSTEM = " ".join(WORDS[i] for i in range(10, 26))  # 16 tokens: 4 full blocks of 4
TOP = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, save_tiny_checkpoint("llama", path)


def engine_for(path, **kwargs) -> LLMEngine:
    # 16 tokens a step: every prompt below is prefilled in chunks; blocks of 4: prefix-cache hits
    args = dict(enforce_eager=True, device="cpu", dtype="float32", max_model_len=96, block_size=4,
                max_num_batched_tokens=16, max_num_seqs=4)
    return LLMEngine.from_engine_args(str(path), **{**args, **kwargs})


def reference(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] float64: log-probabilities of the next token at each prompt position."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
    return logits.double().log_softmax(-1)


def assert_prompt_logprobs_match(hf, out, k: int = TOP) -> None:
    ids = out.prompt_token_ids
    ref = reference(hf, ids)
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    for pos, entry in enumerate(plp[1:]):
        token, want = ids[pos + 1], ref[pos]
        assert entry[token].logprob == pytest.approx(want[token].item(), abs=1e-4), (out.request_id, pos)
        assert entry[token].rank == int((want > want[token] + 1e-6).sum()) + 1
        top = want.topk(k)
        others = {t: e for t, e in entry.items() if t != token or e.rank <= k}
        assert len(entry) in (k, k + 1) and len(others) == k
        for rank, (value, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert entry[t].logprob == pytest.approx(value, abs=1e-4) and entry[t].rank == rank


def test_chunked_preempted_and_cached_prompts_match_transformers(checkpoint):
    path, hf = checkpoint
    engine = engine_for(path)
    users = prompts(3, seed=5, min_len=20, max_len=30)
    # a request without prompt logprobs puts the shared prefix in the cache
    warm = run_engine(engine, [("warm", f"{SYSTEM} {users[0]}", SamplingParams(temperature=0, max_tokens=2))])
    assert warm["warm"].prompt_logprobs is None
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=TOP)
    # "cached": the same prefix, so it would hit the cache; "mid": preempted between its chunks;
    # "late": preempted after its prompt, while decoding (its prompt is recomputed)
    for rid, user in zip(("cached", "mid", "late"), users):
        engine.add_request(rid, f"{SYSTEM} {user}", params)
    final, steps, preempted = {}, 0, set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        steps += 1
        for rid, when in (("mid", lambda s: 0 < s.num_computed_tokens < s.num_prompt_tokens),
                          ("late", lambda s: s.num_output_tokens == 2)):
            seq = engine.scheduler.get(rid)
            if rid not in preempted and seq is not None and seq.status.value == "running" and when(seq):
                engine.scheduler.preempt(seq)
                preempted.add(rid)
    assert preempted == {"mid", "late"}
    assert engine.stats().num_preemptions == 2
    for out in final.values():
        assert len(out.prompt_token_ids) > engine.config.max_num_batched_tokens  # chunked
        assert_prompt_logprobs_match(hf, out)
    # the cache holds SYSTEM's blocks, but a request asking for prompt logprobs does not read them
    assert final["cached"].metrics.num_cached_tokens == 0
    again = run_engine(engine, [("again", f"{SYSTEM} {users[0]}", SamplingParams(temperature=0, max_tokens=2))])
    assert again["again"].metrics.num_cached_tokens >= 16


def test_only_asking_requests_compute_prompt_logits(checkpoint, monkeypatch):
    path, hf = checkpoint
    engine = engine_for(path, max_num_batched_tokens=64)
    rows = []
    compute_logits = engine.runner.model.compute_logits
    monkeypatch.setattr(engine.runner.model, "compute_logits",
                        lambda hidden: rows.append(hidden.shape[0]) or compute_logits(hidden))
    ps = prompts(2, seed=6, min_len=8, max_len=12)
    final = run_engine(engine, [("plain", ps[0], SamplingParams(temperature=0, max_tokens=1)),
                                ("asks", ps[1], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))])
    # one step: 2 sampled rows, and the asking prompt's positions but its last
    assert sorted(rows) == sorted([2, len(final["asks"].prompt_token_ids) - 1])
    assert final["plain"].prompt_logprobs is None
    assert_prompt_logprobs_match(hf, final["asks"], k=0)
    assert all(len(e) == 1 for e in final["asks"].prompt_logprobs[1:])  # k = 0: the prompt token only


def test_transformers_backend_n2_and_delta_outputs(checkpoint):
    path, hf = checkpoint
    engine = engine_for(path, model_impl="transformers")
    prompt = f"{SYSTEM} {prompts(1, seed=7, min_len=10, max_len=10)[0]}"
    engine.add_request("d", prompt, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=TOP, n=2,
                                                   output_kind="delta"))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert_prompt_logprobs_match(hf, outs[0])  # the first output carries them all, once
    assert all(o.prompt_logprobs == [] for o in outs[1:]) and len(outs) > 1


def test_compiled_forward_gives_the_same_prompt_logprobs(checkpoint):
    path, hf = checkpoint
    engine = engine_for(path, enforce_eager=False)
    ids = prompts(1, seed=8, min_len=30, max_len=30)[0]
    final = run_engine(engine, [("c", ids, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=TOP))])
    assert_prompt_logprobs_match(hf, final["c"])


@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 1.5, True, "2"])
def test_bad_prompt_logprobs_is_a_clear_error(value):
    with pytest.raises(ValueError, match=rf"^SamplingParams.prompt_logprobs must be None or an integer in "
                                         rf"\[0, {MAX_LOGPROBS}\], got"):
        SamplingParams(prompt_logprobs=value)
