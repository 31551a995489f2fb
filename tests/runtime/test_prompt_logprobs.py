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


def assert_prompt_logprobs_match(hf, out, k: int = TOP, atol: float = 1e-4) -> None:
    """out.prompt_logprobs against transformers: the prompt token's logprob and rank, and the top k
    (ids whose reference values are within atol of each other may come in either order)."""
    ids = out.prompt_token_ids
    ref = reference(hf, ids)
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    for pos, entry in enumerate(plp[1:]):
        token, want = ids[pos + 1], ref[pos]
        mine = entry[token]
        assert mine.logprob == pytest.approx(want[token].item(), abs=atol), (out.request_id, pos)
        above, near = int((want > want[token] + atol).sum()), int(((want - want[token]).abs() <= atol).sum())
        assert above + 1 <= mine.rank <= above + near, (out.request_id, pos, mine.rank)
        top = {t: e for t, e in entry.items() if e.rank <= k}
        assert sorted(e.rank for e in top.values()) == list(range(1, k + 1))
        assert len(entry) == k + (token not in top)
        for t, e in top.items():
            assert e.logprob == pytest.approx(want[t].item(), abs=atol)
        assert sorted((e.logprob for e in top.values()), reverse=True) == pytest.approx(
            want.topk(k).values.tolist(), abs=atol)


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


def one_token_chunks_beside_a_decode(engine, hf, atol: float = 1e-4):
    """2 tokens a step: "long" decodes while "asks" is prefilled one token a step, so every step is
    decode-shaped (on CUDA: a decode CUDA graph replay) with a prompt position among its rows."""
    engine.add_request("long", prompts(1, seed=9, min_len=3, max_len=3)[0],
                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()
    engine.add_request("asks", prompts(1, seed=10, min_len=12, max_len=12)[0],
                       SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP))
    final = {}
    while "asks" not in final:
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert_prompt_logprobs_match(hf, final["asks"], atol=atol)


def test_one_token_prompt_chunks_in_decode_shaped_steps(checkpoint):
    path, hf = checkpoint
    one_token_chunks_beside_a_decode(engine_for(path, max_num_batched_tokens=2, max_num_seqs=2), hf)


@pytest.mark.gpu
def test_cuda_graphs_and_compiled_steps_give_transformers_prompt_logprobs(checkpoint):
    torch.backends.cuda.matmul.allow_tf32 = False
    path, hf = checkpoint
    engine = engine_for(path, device="cuda", enforce_eager=False, max_num_batched_tokens=2, max_num_seqs=2,
                        gpu_memory_utilization=0.3)
    hf_cpu = hf.to("cpu")
    one_token_chunks_beside_a_decode(engine, hf_cpu, atol=2e-3)  # Triton's fp32 dots may use TF32
    assert engine.runner.num_graph_replays > 0
    engine = engine_for(path, device="cuda", enforce_eager=False, gpu_memory_utilization=0.3)
    final = run_engine(engine, [(str(i), f"{SYSTEM} {p}", SamplingParams(temperature=0, max_tokens=4,
                                                                         prompt_logprobs=TOP))
                                for i, p in enumerate(prompts(4, seed=11, min_len=10, max_len=30))])
    for out in final.values():
        assert_prompt_logprobs_match(hf_cpu, out, atol=2e-3)
