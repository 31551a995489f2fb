"""Speculative decoding through LLMEngine (fp32 tiny models): greedy outputs identical to the engine
without speculation for every method, across preemption, chunked prefill and prefix caching, with
stops and max_tokens inside accepted runs; sampled outputs distributed as transformers' model says
(chi-square); no leaked KV blocks; bad configs refused at start; the counters in stats and /metrics."""

import pytest
import torch

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.spec_decode import speculator
from tests.runtime.hf_checkpoints import WORDS, prompts, run_engine, save_tiny_checkpoint, single_thread  # noqa: F401
from tests.runtime.spec_decode.stats import pooled_p_value

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = SamplingParams(temperature=0, max_tokens=24)
# 24 blocks x 4 tokens for 8 sequences of up to ~84 tokens, 16 tokens per step: preemption and chunked prefill
TIGHT = dict(enforce_eager=True, max_model_len=96, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16,
             max_num_seqs=6)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    target = tmp_path_factory.mktemp("target")
    other = tmp_path_factory.mktemp("draft")
    return target, save_tiny_checkpoint("llama", target, seed=0), other, save_tiny_checkpoint("llama", other, seed=1)


def methods(checkpoints, k=3):
    target, _, other, _ = checkpoints
    return {"ngram": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3},
            "layer_skip": {"method": "layer_skip", "num_layers": 1, "num_speculative_tokens": k},
            "draft_model": {"model": str(other), "num_speculative_tokens": k},
            "self_draft": {"model": str(target), "num_speculative_tokens": k},  # accepts everything
            "int4_self_draft": {"quantization": "int4", "num_speculative_tokens": k}}  # the target's int4 copy


@pytest.fixture(autouse=True)
def never_pause(monkeypatch):
    # random models accept few drafts; the tests want every decode step to speculate
    monkeypatch.setattr(speculator, "PAUSE_STEPS", 0)


def run_checked(engine, requests) -> dict:
    """run_engine, checking the block pool after every step."""
    final = run_engine(engine, requests,
                       after_step=lambda e: e.block_manager.check_invariants(e.scheduler.running))
    assert engine.block_manager.num_used_blocks == 0
    return final


def same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        x, y = a[rid].outputs[0], b[rid].outputs[0]
        assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == (y.token_ids, y.text, y.finish_reason,
                                                                           y.stop_reason), rid


@pytest.mark.parametrize("method", ["ngram", "layer_skip", "draft_model", "self_draft", "int4_self_draft"])
def test_greedy_is_identical_across_preemption(checkpoints, method):
    target = str(checkpoints[0])
    # repetitive prompts give the n-gram proposer matches
    ps = [p + " " + p for p in prompts(8, seed=2, min_len=5, max_len=30)]
    requests = [(str(i), p, GREEDY) for i, p in enumerate(ps)]
    base = run_engine(LLMEngine.from_engine_args(target, **TIGHT), requests)
    engine = LLMEngine.from_engine_args(target, speculative_config=methods(checkpoints)[method], **TIGHT)
    same_outputs(run_checked(engine, requests), base)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.spec_decode.num_draft_tokens > 0
    if method == "self_draft":
        assert stats.spec_decode.acceptance_rate == 1.0
    if method == "int4_self_draft":  # close to the target, not equal to it
        assert 0.3 < stats.spec_decode.acceptance_rate < 1.0


def test_stops_and_max_tokens_inside_accepted_runs(checkpoints):
    """The self-draft accepts all 4 drafts: 5 tokens per step, so these limits fall inside runs."""
    target = str(checkpoints[0])
    prompt = prompts(1, seed=5, min_len=8, max_len=8)[0]
    base_out = run_engine(LLMEngine.from_engine_args(target, enforce_eager=True, max_model_len=128),
                          [("x", prompt, SamplingParams(temperature=0, max_tokens=30))])["x"].outputs[0]
    tokens, words = base_out.token_ids, base_out.text.split()
    assert len(tokens) == 30 and len(words) == 30  # one word per token
    new = next(i for i in range(7, 20) if tokens[i] not in tokens[:i])  # a first occurrence inside run 2
    cases = [SamplingParams(temperature=0, max_tokens=m) for m in (2, 7, 13)] + [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tokens[new]]),
        SamplingParams(temperature=0, max_tokens=30, stop=[f"{words[new - 1]} {words[new]}"]),
        SamplingParams(temperature=0, max_tokens=30, stop=[words[new]], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=30, logprobs=2, prompt_logprobs=1)]
    requests = [(str(i), prompt, p) for i, p in enumerate(cases)]
    kw = dict(enforce_eager=True, max_model_len=128)
    base = run_engine(LLMEngine.from_engine_args(target, **kw), requests)
    spec = {"model": target, "num_speculative_tokens": 4}
    engine = LLMEngine.from_engine_args(target, speculative_config=spec, **kw)
    got = run_checked(engine, requests)
    same_outputs(got, base)
    assert got["3"].outputs[0].token_ids == tokens[:new + 1]
    assert engine.stats().spec_decode.mean_accepted_length > 4


def test_logprobs_match_without_speculation(checkpoints):
    target = str(checkpoints[0])
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=2)
    requests = [(str(i), p + " " + p, params) for i, p in enumerate(prompts(3, seed=6, min_len=4, max_len=10))]
    base = run_engine(LLMEngine.from_engine_args(target, enforce_eager=True, max_model_len=128), requests)
    spec = {"model": str(checkpoints[0]), "num_speculative_tokens": 3}
    got = run_checked(LLMEngine.from_engine_args(target, enforce_eager=True, max_model_len=128,
                                                 speculative_config=spec), requests)
    for rid in base:
        a, b = got[rid], base[rid]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs + a.prompt_logprobs[1:], b.outputs[0].logprobs + b.prompt_logprobs[1:]):
            assert x.keys() == y.keys()
            for t in x:
                assert x[t].rank == y[t].rank and abs(x[t].logprob - y[t].logprob) < 1e-4
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-3)


@pytest.mark.parametrize("method", ["ngram", "layer_skip", "draft_model", "int4_self_draft"])
def test_sampled_tokens_follow_the_target_distribution(checkpoints, method):
    """Tokens 2 and 3 (verified from drafts; token 1 comes from the prefill) against transformers'
    top-3 distribution given the tokens before them."""
    target, hf, _, _ = checkpoints
    spec = dict(methods(checkpoints, k=2)[method], disable_by_batch_size=1000)
    n = 400
    # holds tokens this random model likes to sample, so that the n-gram proposer finds matches
    prompt = "w5 w80 w67 w80 w14 w39 w91 w80 w80 w14"
    requests = [(str(i), prompt, SamplingParams(temperature=1.0, top_k=3, max_tokens=4, seed=i)) for i in range(n)]
    engine = LLMEngine.from_engine_args(str(target), enforce_eager=True, max_model_len=64, max_num_seqs=n,
                                        max_num_batched_tokens=4096, speculative_config=spec)
    final = run_checked(engine, requests)
    s = engine.stats().spec_decode
    assert s.num_draft_tokens > n // 8 and s.num_accepted_tokens > 0
    prompt_ids = final["0"].prompt_token_ids
    samples = [tuple(out.outputs[0].token_ids) for out in final.values()]
    assert all(len(s) == 4 for s in samples)
    groups = []
    for length in (1, 2):  # token length + 1 given the tokens before it
        by_context: dict[tuple, list[int]] = {}
        for s in samples:
            by_context.setdefault(s[:length], []).append(s[length])
        for context, nexts in by_context.items():
            if len(nexts) < 40:
                continue  # too few for the chi-square approximation
            with torch.no_grad():
                logits = hf(torch.tensor([prompt_ids + list(context)])).logits[0, -1].double()
            kth = logits.topk(3).values[-1]
            probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
            groups.append((torch.bincount(torch.tensor(nexts), minlength=len(probs)), probs))
    assert len(groups) >= 3
    assert pooled_p_value(groups) > 1e-3


def test_int4_self_draft_quantizes_a_copy_sharing_the_other_tensors(checkpoints):
    from fusecc.quantization.linear import WeightOnlyLinear

    engine = LLMEngine.from_engine_args(str(checkpoints[0]), enforce_eager=True, max_model_len=64,
                                        speculative_config={"quantization": "int4", "num_speculative_tokens": 2})
    target, draft = engine.runner.model, engine.speculator.proposer.model
    assert type(target.model.layers[0].mlp.down_proj) is torch.nn.Linear  # the target stays float
    assert isinstance(draft.model.layers[0].mlp.down_proj, WeightOnlyLinear)
    assert draft.model.layers[0].mlp.down_proj.bits == 4
    assert draft.model.embed_tokens.weight is target.model.embed_tokens.weight
    assert draft.model.norm.weight is target.model.norm.weight
    assert engine.speculator.proposer.kv_caches[0][0].data_ptr() != engine.runner.kv_caches[0][0].data_ptr()
    assert engine.speculator.proposer.draft_cost < 0.5  # int4 linears: it reads far fewer bytes


@pytest.mark.parametrize("spec, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_max must be"),
    ({"method": "layer_skip", "num_speculative_tokens": 2}, "num_layers must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown keys ['lookahead']"),
    ({"quantization": "awq", "num_speculative_tokens": 2}, "quantization must be one of ['int8', 'int4', 'fp8']"),
    ({"method": "ngram", "quantization": "int4", "num_speculative_tokens": 2}, "quantization is only for method"),
    ('{"method": ', "not valid JSON"),
])
def test_bad_configs_fail_at_start_in_one_line(spec, message):
    with pytest.raises(ValueError, match="^speculative_config") as e:
        LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=64, speculative_config=spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_drafts_must_share_the_vocabulary(checkpoints, tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.runtime.hf_checkpoints import VOCAB, tiny_config

    target = str(checkpoints[0])
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 1\]"):
        LLMEngine.from_engine_args(target, enforce_eager=True, max_model_len=64,
                                   speculative_config={"method": "layer_skip", "num_layers": 2,
                                                       "num_speculative_tokens": 2})
    small = tiny_config("llama")
    small.vocab_size = 96
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"vocabulary \(96 tokens\) differs from the target's \(128\)"):
        LLMEngine.from_engine_args(target, enforce_eager=True, max_model_len=64,
                                   speculative_config={"model": str(tmp_path / "small"), "num_speculative_tokens": 2})
    # same size, other token -> id map
    save_tiny_checkpoint("llama", tmp_path / "other_tok")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: VOCAB + 2 - i for i, w in enumerate(WORDS, start=3)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "other_tok")
    with pytest.raises(ValueError, match="tokenizer maps tokens to other ids"):
        LLMEngine.from_engine_args(target, enforce_eager=True, max_model_len=64,
                                   speculative_config={"model": str(tmp_path / "other_tok"),
                                                       "num_speculative_tokens": 2})


def test_counters_in_stats_and_metrics(checkpoints):
    from fusecc.serve.metrics import ServerMetrics

    target = str(checkpoints[0])
    engine = LLMEngine.from_engine_args(target, enforce_eager=True, max_model_len=128,
                                        speculative_config={"model": target, "num_speculative_tokens": 3})
    assert engine.stats().spec_decode.num_drafts == 0
    run_engine(engine, [("a", prompts(1, seed=7)[0], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))])
    s = engine.stats().spec_decode
    # token 1 from the prefill, then 2 windows of 3 accepted drafts + 1 each (the draft is the target)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (2, 6, 6)
    assert s.acceptance_rate == 1.0 and s.mean_accepted_length == 4.0
    body = ServerMetrics(engine).render().decode()
    assert "fusecc_spec_decode_num_accepted_tokens_total 6.0" in body
    assert "fusecc_spec_decode_mean_accepted_length 4.0" in body


class _EagerCall:
    """CapturedCall's stand-in on CPU: 'replay' reruns the call on the same static buffers."""

    def __init__(self, fn, args, pool=None):
        self.fn, self.args = fn, args

    def replay(self):
        return self.fn(*self.args)


@pytest.mark.parametrize("method", ["ngram", "self_draft"])
def test_padded_verification_graph_inputs_give_identical_greedy(checkpoints, method, monkeypatch):
    """VerifyGraphs' padding (k + 1 rows per sequence, bucketed batch, wider block tables) run
    eagerly on CPU: n-gram proposals of varying length and empty bucket slots."""
    from fusecc.runtime.spec_decode import verify_graphs

    monkeypatch.setattr(verify_graphs, "CapturedCall", _EagerCall)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    target = str(checkpoints[0])
    ps = [p + " " + p for p in prompts(5, seed=8, min_len=5, max_len=20)]
    requests = [(str(i), p, GREEDY) for i, p in enumerate(ps)]
    base = run_engine(LLMEngine.from_engine_args(target, **TIGHT), requests)
    engine = LLMEngine.from_engine_args(target, speculative_config=methods(checkpoints)[method], **TIGHT)
    engine.runner.verify_graphs = verify_graphs.VerifyGraphs(engine.runner, 3, max_batch=4)
    proposer = engine.speculator.proposer
    if method == "self_draft":  # and the draft's decode steps through StepGraphs(q=1)
        proposer.graphs = verify_graphs.StepGraphs(proposer.forward, proposer.kv_caches, engine.runner, 1, 4)
    same_outputs(run_checked(engine, requests), base)
    assert engine.runner.verify_graphs.num_replays > 0
    if method == "self_draft":
        assert proposer.graphs.num_replays > 0 and engine.stats().spec_decode.acceptance_rate == 1.0


def test_speculation_turns_itself_down(checkpoints, monkeypatch):
    """Off while more sequences decode than disable_by_batch_size; paused when acceptance is below
    what a draft token costs (the other random model accepts almost nothing)."""
    monkeypatch.setattr(speculator, "PAUSE_STEPS", 64)
    target, _, other, _ = checkpoints
    same_length = [" ".join(["w50 w51 w52"] * 4)] * 6
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 5}
    engine = LLMEngine.from_engine_args(str(target), enforce_eager=True, max_model_len=128, speculative_config=ngram)
    run_engine(engine, [(str(i), p, params) for i, p in enumerate(same_length)])
    assert engine.stats().spec_decode.num_drafts == 0  # 6 decode together, always
    run_engine(engine, [("one", same_length[0], params)])
    assert engine.stats().spec_decode.num_drafts > 0
    draft = {"model": str(other), "num_speculative_tokens": 3}
    engine = LLMEngine.from_engine_args(str(target), enforce_eager=True, max_model_len=256, speculative_config=draft)
    # a draft as large as the target costs a forward per token: the rate it needs is capped at 0.9
    assert engine.speculator.min_acceptance_rate == 0.9
    run_engine(engine, [("a", prompts(1, seed=9)[0], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))])
    s = engine.stats().spec_decode
    assert s.num_paused_steps > 0 and s.num_drafts < 30


@pytest.mark.parametrize("method", ["draft_model", "int4_self_draft", "layer_skip"])
def test_the_draft_memory_the_target_reserves_is_what_the_draft_allocates(checkpoints, method):
    """The target sizes its KV pool before the draft exists (ModelRunner._profile_num_blocks on CUDA):
    draft_memory's estimate of the draft's weights and per-block KV bytes matches what the draft then
    allocates (weights within 5%; KV exactly)."""
    from fusecc.runtime.spec_decode.draft_memory import draft_memory

    target = checkpoints[0]
    spec = methods(checkpoints)[method]
    engine = LLMEngine.from_engine_args(str(target), speculative_config=spec, max_model_len=64, num_kv_blocks=24)
    runner, proposer = engine.runner, engine.speculator.proposer
    weights, block_bytes = draft_memory(spec, runner.model, runner.dtype)
    if method == "layer_skip":  # the target's own layers and cache
        assert (weights, block_bytes) == (0, 0)
        return
    target_tensors = {t.data_ptr() for t in [*runner.model.parameters(), *runner.model.buffers()]}
    own = {t.data_ptr(): t.numel() * t.element_size() for t in proposer.model.parameters()
           if t.data_ptr() not in target_tensors}
    assert abs(weights - sum(own.values())) <= 0.05 * sum(own.values()), (weights, sum(own.values()))
    pool = sum(k.numel() * k.element_size() * 2 for k, _ in proposer.kv_caches)
    assert block_bytes * engine.config.block_size * engine.config.num_kv_blocks == pool


def test_a_compiled_drafts_graphs_are_compiled_at_start(checkpoints, tmp_path):
    # the draft's forward is warmed up with the target's: speculative steps compile nothing later
    # (a one-layer draft: its graphs are not the target's)
    from torch._dynamo.utils import counters

    target = checkpoints[0]
    save_tiny_checkpoint("llama", tmp_path, seed=3, num_hidden_layers=1)
    engine = LLMEngine.from_engine_args(str(target), speculative_config={"model": str(tmp_path),
                                                                         "num_speculative_tokens": 3},
                                        enforce_eager=False, max_model_len=64, num_kv_blocks=24,
                                        max_num_batched_tokens=32, max_num_seqs=3)
    at_start = counters["stats"]["unique_graphs"]
    requests = [(str(i), p, SamplingParams(temperature=0, max_tokens=10)) for i, p in enumerate(prompts(3, seed=2))]
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_checked(engine, requests)
    assert engine.stats().spec_decode.num_drafts > 0
    assert counters["stats"]["unique_graphs"] == at_start
