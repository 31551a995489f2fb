"""Scheduler policy: batching, chunked prefill, budgets, preemption, priority, abort, stopping.

Expected schedules are derived by hand from the policy in the scheduler's docstring.
"""

import pytest

from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import Scheduler, SchedulerFullError
from fusecc.runtime.sequence import Sequence, SequenceStatus
from tests.runtime.scheduling import commit

EOS = 0


def make(num_blocks=64, block_size=4, prefix=False, **cfg):
    cfg.setdefault("max_model_len", min(64, num_blocks * block_size))
    cfg.setdefault("max_num_batched_tokens", 64)
    cfg.setdefault("max_num_seqs", 8)
    config = EngineConfig(block_size=block_size, enable_prefix_caching=prefix, **cfg)
    return Scheduler(config, BlockManager(num_blocks, block_size, prefix))


def add(sched, rid, prompt, arrival, priority=0, **params):
    params.setdefault("max_tokens", 100)
    s = Sequence(rid, list(prompt), SamplingParams(**params), block_size=sched.config.block_size,
                 arrival_time=float(arrival), priority=priority)
    sched.add(s)
    return s


def step(sched, token=7):
    """One engine step with a fake model that samples `token` (or token(seq)) for every row."""
    out = sched.schedule()
    toks = [token(e.seq) if callable(token) else token for e in out.sampled]
    commit(sched, out, toks, eos=[EOS])
    sched.block_manager.check_invariants(sched.running)
    return out


def summary(out):
    return [(e.seq.request_id, e.start, e.num_new_tokens, "P" if e.is_prefill else "D", e.do_sample)
            for e in out.scheduled]


def test_prefill_then_decode_with_positions_and_slots():
    s = make()
    a = add(s, "a", [11, 12, 13, 14, 15], 0)
    b = add(s, "b", [21, 22], 1)
    out = step(s, token=9)
    assert summary(out) == [("a", 0, 5, "P", True), ("b", 0, 2, "P", True)]
    out = s.schedule()
    assert summary(out) == [("a", 5, 1, "D", True), ("b", 2, 1, "D", True)]
    ea, eb = out.scheduled
    assert ea.token_ids == [9] and list(ea.positions) == [5] and ea.context_len == 6
    bs = s.config.block_size
    assert ea.slot_mapping == [a.block_table[1] * bs + 1]
    assert eb.slot_mapping == [b.block_table[0] * bs + 2]
    assert out.num_batched_tokens == 2


def test_max_tokens_finishes_with_length():
    s = make()
    a = add(s, "a", [1, 2, 3], 0, max_tokens=3)
    for _ in range(3):
        step(s, token=5)
    assert a.finish_reason == "length" and a.output_token_ids == [5, 5, 5]
    assert s.take_finished() == [a] and s.take_finished() == []
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_eos_stops_unless_ignored_and_respects_min_tokens():
    s = make()
    a = add(s, "a", [1, 2], 0)
    b = add(s, "b", [1, 2], 1, ignore_eos=True, max_tokens=3)
    c = add(s, "c", [1, 2], 2, min_tokens=2)
    step(s, token=EOS)
    assert a.finish_reason == "stop" and a.output_token_ids == [EOS] and a.stop_reason is None
    assert not b.is_finished and not c.is_finished  # c has 1 of its 2 minimum tokens
    step(s, token=EOS)
    assert c.finish_reason == "stop" and c.num_output_tokens == 2
    step(s, token=EOS)
    assert b.finish_reason == "length" and b.output_token_ids == [EOS] * 3
    assert s.stats.num_finished == {"stop": 2, "length": 1}


def test_stop_token_ids_record_the_stop_reason():
    s = make()
    a = add(s, "a", [1, 2], 0, stop_token_ids=[42])
    step(s, token=3)
    step(s, token=42)
    assert a.finish_reason == "stop" and a.stop_reason == 42 and a.output_token_ids == [3, 42]


def test_max_model_len_finishes_with_length():
    s = make(max_model_len=8)
    a = add(s, "a", range(1, 6), 0)
    for _ in range(3):
        step(s)
    assert a.finish_reason == "length" and a.num_tokens == 8


def test_chunked_prefill_and_decodes_first():
    s = make(max_num_batched_tokens=8, max_num_seqs=4)
    a = add(s, "a", [1, 2, 3], 0)
    assert summary(step(s)) == [("a", 0, 3, "P", True)]
    long = add(s, "long", range(1, 21), 1)  # 20 tokens; budget left after a's decode: 7
    assert summary(step(s)) == [("a", 3, 1, "D", True), ("long", 0, 7, "P", False)]
    assert long.num_output_tokens == 0 and long.num_computed_tokens == 7
    assert summary(step(s)) == [("a", 4, 1, "D", True), ("long", 7, 7, "P", False)]
    assert summary(step(s)) == [("a", 5, 1, "D", True), ("long", 14, 6, "P", True)]
    assert long.num_output_tokens == 1
    assert summary(step(s)) == [("a", 6, 1, "D", True), ("long", 20, 1, "D", True)]


def test_without_chunked_prefill_a_long_prompt_waits_for_a_full_budget():
    s = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    add(s, "a", [1, 2, 3], 0)
    step(s)
    add(s, "b", range(1, 15), 1)  # 14 tokens: fits in the 15 left after a's decode
    add(s, "c", range(1, 4), 2)
    assert summary(step(s)) == [("a", 3, 1, "D", True), ("b", 0, 14, "P", True)]
    # c (3 tokens) does not fit in the 1 token left, and is not chunked; next step it fits.
    assert summary(step(s)) == [("a", 4, 1, "D", True), ("b", 14, 1, "D", True), ("c", 0, 3, "P", True)]

    s = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    add(s, "a", [1, 2, 3], 0)
    step(s)
    add(s, "b", range(1, 16), 1)
    add(s, "x", [1], 0.5)  # arrives before b: admitted first, leaving 14 < 15 for b
    assert summary(step(s)) == [("a", 3, 1, "D", True), ("x", 0, 1, "P", True)]
    assert s.get("b").status is SequenceStatus.WAITING


def test_max_num_seqs_caps_the_running_batch():
    s = make(max_num_seqs=2)
    for i in range(3):
        add(s, str(i), [1, 2], i)
    assert [e.seq.request_id for e in step(s).scheduled] == ["0", "1"]
    assert len(s.running) == 2 and [q.request_id for q in s.waiting] == ["2"]


def test_preemption_by_recompute_picks_the_latest_arrival_and_loses_nothing():
    # 4 blocks of 2 slots. a and b (3-token prompts) take 2 blocks each; at their second decode
    # both need a third block: a (earlier) preempts b.
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    a = add(s, "a", [1, 2, 3], 0, max_tokens=4)
    b = add(s, "b", [4, 5, 6], 1, max_tokens=4)
    step(s, token=8)  # both prefill; 4 tokens each now
    out = step(s, token=9)  # both decode position 3 (in block 1): no new blocks
    assert summary(out) == [("a", 3, 1, "D", True), ("b", 3, 1, "D", True)]
    out = step(s, token=10)  # position 4 needs a third block each; none free
    assert [q.request_id for q in out.preempted] == ["b"]
    assert summary(out) == [("a", 4, 1, "D", True)]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == [8, 9] and s.stats.num_preemptions == 1 and b.num_preemptions == 1
    out = step(s, token=11)  # a: 4th token -> length; b (3 blocks) does not fit while a holds 3 of 4
    assert a.finish_reason == "length"
    out = step(s, token=12)
    # b recomputes prompt + both outputs (5 tokens) and samples its third token.
    assert summary(out) == [("b", 0, 5, "P", True)]
    assert b.output_token_ids == [8, 9, 12]
    step(s, token=13)
    assert b.finish_reason == "length" and b.output_token_ids == [8, 9, 12, 13]
    assert {q.request_id for q in s.take_finished()} == {"a", "b"}


def test_preempted_sequence_reuses_its_cached_prefix():
    s = make(num_blocks=4, block_size=2, max_model_len=8, prefix=True)
    add(s, "a", [1, 2, 3], 0, max_tokens=4)
    b = add(s, "b", [4, 5, 6], 1, max_tokens=4)
    for tok in (8, 9, 10, 11):
        step(s, token=tok)
    # b's freed blocks (4 5) (6 8) were cached; a's growth took one of them (the LRU plain one first).
    out = step(s, token=12)
    (e,) = out.scheduled
    assert e.seq is b and e.start > 0 and e.start + e.num_new_tokens == 5 and b.num_cached_tokens == e.start


def test_priority_orders_admission_and_preemption():
    s = make(num_blocks=4, block_size=2, max_model_len=8, max_num_seqs=1)
    add(s, "late-urgent", [1], 5, priority=-1)
    add(s, "early", [2], 0)
    add(s, "early2", [3], 1)
    assert [e.seq.request_id for e in step(s).scheduled] == ["late-urgent"]
    assert [q.request_id for q in s.waiting] == ["early", "early2"]

    s = make(num_blocks=4, block_size=2, max_model_len=8)
    lo = add(s, "lo", [1, 2, 3], 0, priority=1)  # arrives first but has the larger priority value
    hi = add(s, "hi", [4, 5, 6], 1, priority=0)
    step(s)
    step(s)
    out = step(s)
    assert out.preempted == [lo] and hi.status is SequenceStatus.RUNNING


def test_abort_any_state_is_reported_once():
    s = make()
    r = add(s, "r", [1, 2, 3], 0)
    w = add(s, "w", [1, 2, 3], 1)
    step(s)  # r and w running; abort r while running and q while waiting
    q = add(s, "q", [5], 2)
    assert s.abort("r") and s.abort("q")
    assert not s.abort("r") and not s.abort("nope")
    assert r.finish_reason == "abort" and q.finish_reason == "abort" and r.block_table == []
    assert s.take_finished() == [r, q] and s.take_finished() == []
    assert [x.request_id for x in s.running] == ["w"] and s.waiting == []
    s.block_manager.check_invariants([w])
    assert s.stats.num_finished["abort"] == 2


def test_abort_between_schedule_and_postprocess_is_skipped():
    s = make()
    a = add(s, "a", [1, 2], 0)
    b = add(s, "b", [1, 2], 1)
    out = s.schedule()
    s.abort("a")
    s.postprocess(out, [5, 6])
    assert a.output_token_ids == [] and b.output_token_ids == [6]
    s.block_manager.check_invariants([b])


def test_finish_hook_for_stop_strings():
    s = make()
    a = add(s, "a", [1, 2], 0)
    step(s)
    assert s.finish(a, "stop", "###") and not s.finish(a, "stop")
    assert a.finish_reason == "stop" and a.stop_reason == "###" and a.block_table == []
    assert s.take_finished() == [a] and not s.has_unfinished()


def test_add_asserts_what_the_engine_checks():
    # the engine refuses these with a ValueError (tests/runtime/test_engine.py); here they are invariants
    s = make(num_blocks=4, block_size=4, max_model_len=16)
    with pytest.raises(AssertionError, match="max_model_len"):
        add(s, "a", range(16), 0)
    add(s, "ok", range(15), 0)
    with pytest.raises(AssertionError, match="already in use"):
        add(s, "ok", [1], 1)
    with pytest.raises(ValueError, match="exceeds the KV pool"):
        Scheduler(EngineConfig(block_size=4, max_model_len=17, max_num_batched_tokens=256),
                  BlockManager(4, 4))


def test_admission_control():
    s = make(max_waiting=2)
    add(s, "a", [1], 0)
    add(s, "b", [1], 1)
    with pytest.raises(SchedulerFullError):
        add(s, "c", [1], 2)
    step(s)  # both admitted: the queue has room again
    add(s, "c", [1], 2)


def test_shared_system_prompt_hits_the_prefix_cache():
    s = make(prefix=True)
    system = list(range(100, 110))  # 10 tokens: 2 full blocks of 4
    add(s, "a", system + [1], 0)
    step(s)
    b = add(s, "b", system + [2, 3], 1)
    out = step(s)
    eb = next(e for e in out.scheduled if e.seq is b)
    assert (eb.start, eb.num_new_tokens) == (8, 4) and b.num_cached_tokens == 8
    assert s.block_manager.stats.prefix_cache_hits == 8


def test_preempting_an_already_scheduled_decode_withdraws_its_entry():
    # b (less urgent, priority 1) decodes; a (priority 0) arrives later with a long, chunked prompt.
    # Decodes go first, so when a's chunk finds no block, the victim b is already scheduled.
    s = make(num_blocks=6, block_size=2, max_model_len=12, max_num_batched_tokens=4, max_num_seqs=2)
    b = add(s, "b", [1, 2], 0, priority=1)
    step(s)  # b: 3 tokens, 1 block (2 after its next decode)
    a = add(s, "a", range(1, 11), 1, priority=0)
    assert summary(step(s)) == [("b", 2, 1, "D", True), ("a", 0, 3, "P", False)]
    assert summary(step(s)) == [("b", 3, 1, "D", True), ("a", 3, 3, "P", False)]
    assert s.block_manager.num_free_blocks == 1
    out = step(s)  # b's decode takes the last block; a's chunk (positions 6-8) needs 2 more
    assert out.preempted == [b]
    assert summary(out) == [("a", 6, 3, "P", False)]
    assert b.output_token_ids == [7, 7, 7]  # the withdrawn decode sampled nothing
    assert a.num_computed_tokens == 9


def test_engine_loop_outputs_do_not_depend_on_pool_chunking_or_prefix_cache():
    """The engine contract end to end with a fake model whose logits are a function of the KV it
    reads through the block table: a tiny pool (preemption), a small budget (chunked prefill) and
    prefix caching must give the same tokens as a roomy run. Rows are greedy or seeded."""
    import torch

    from fusecc.runtime.sampler import Sampler, SamplingMetadata

    vocab = 16

    def run(num_blocks, budget, prefix):
        s = make(num_blocks=num_blocks, block_size=4, prefix=prefix, max_model_len=32,
                 max_num_batched_tokens=budget, max_num_seqs=4)
        system = [5, 6, 7, 8, 9, 10]
        for i in range(6):
            params = dict(max_tokens=8, temperature=0.0) if i % 2 else dict(max_tokens=8, seed=100 + i)
            add(s, f"r{i}", system[: 2 + i] + [11 + i] * (3 + 2 * i), i, **params)
        kv, sampler = {}, Sampler(seed=0)
        while s.has_unfinished():
            out = s.schedule()
            for e in out.scheduled:  # the forward: write the new tokens' "KV"...
                for slot, tok in zip(e.slot_mapping, e.token_ids):
                    kv[slot] = tok
            rows = []
            for e in out.sampled:  # ...and compute the last position from the whole cached context
                bt = e.block_table
                context = tuple(kv[bt[p // 4] * 4 + p % 4] for p in range(e.context_len))
                rows.append(torch.randn(vocab, generator=torch.Generator().manual_seed(hash(context) % 2**31)))
            seqs = [e.seq for e in out.sampled]
            if rows:
                md = SamplingMetadata.build(seqs, vocab, "cpu", eos_token_ids=[EOS])
                tokens = sampler(torch.stack(rows), md).token_ids.tolist()
            else:
                tokens = []
            commit(s, out, tokens, eos=[EOS])
        done = {q.request_id: q for q in s.take_finished()}
        return {rid: (q.output_token_ids, q.finish_reason) for rid, q in done.items()}, s

    roomy, _ = run(num_blocks=64, budget=64, prefix=False)
    tight, s = run(num_blocks=8, budget=6, prefix=True)
    assert len(roomy) == 6 and tight == roomy
    assert s.stats.num_preemptions > 0 and s.block_manager.stats.prefix_cache_hits > 0
    assert s.block_manager.num_free_blocks == 8
