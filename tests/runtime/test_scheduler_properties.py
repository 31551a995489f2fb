"""Hypothesis state-machine tests of the scheduler and block manager on a tiny pool.

Any interleaving of add / step / abort / forced preemption / stop-string finish must keep:
- the pool exact: every block free xor owned, ref counts == owners (recounted here from the
  block tables), no leak once everything finished;
- the KV right: a fake model runner writes, at each slot it is given, the token prefix that the
  position's KV would encode, and checks every position a sequence attends to holds its own
  prefix (catches a shared block being overwritten, a wrong prefix hit, a stale table);
- every request finished or aborted and reported exactly once, in finitely many steps.
"""

import random
from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import Scheduler
from fusecc.runtime.sequence import Sequence
from tests.runtime.scheduling import commit

BLOCK_SIZE, NUM_BLOCKS, MAX_MODEL_LEN = 4, 8, 32
EOS = 0
VOCAB = 5  # few distinct tokens: prefixes collide often
SYSTEM_PROMPTS = [[], [1, 2, 3, 4, 1, 2, 3, 4], [2, 2, 2, 2, 3]]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(chunked=st.booleans(), prefix=st.booleans(), max_num_seqs=st.integers(1, 4),
                budget=st.integers(4, 12))
    def setup(self, chunked, prefix, max_num_seqs, budget):
        config = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=budget if chunked else MAX_MODEL_LEN,
                              max_model_len=MAX_MODEL_LEN, enable_prefix_caching=prefix,
                              enable_chunked_prefill=chunked)
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, prefix)
        self.sched = Scheduler(config, self.bm)
        self.added: dict[str, Sequence] = {}
        self.reported: Counter[str] = Counter()
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> token prefix whose KV it holds
        self.clock = 0.0
        self.seen = Counter()  # which paths an example exercised (hypothesis --hypothesis-show-statistics)

    # --- rules --------------------------------------------------------------------------------
    @rule(system=st.sampled_from(range(len(SYSTEM_PROMPTS))),
          tail=st.lists(st.integers(1, VOCAB - 1), max_size=26),
          max_tokens=st.integers(1, 8), min_tokens=st.integers(0, 2), priority=st.integers(0, 2),
          ignore_eos=st.booleans())
    def add(self, system, tail, max_tokens, min_tokens, priority, ignore_eos):
        prompt = (SYSTEM_PROMPTS[system] + tail) or [1]
        self.clock += 1.0
        rid = f"r{len(self.added)}"
        seq = Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens),
                                                   ignore_eos=ignore_eos),
                       block_size=BLOCK_SIZE, priority=priority, arrival_time=self.clock)
        if len(prompt) + 1 > MAX_MODEL_LEN:  # the engine refuses it (request_inputs); the scheduler asserts
            return
        self.sched.add(seq)
        self.added[rid] = seq

    @rule(seed=st.integers(0, 2**16))
    def step(self, seed):
        self._step(random.Random(seed))

    @precondition(lambda self: self.added)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.added)))
        was_live = self.sched.get(rid) is not None
        assert self.sched.abort(rid) == was_live
        self._collect()

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def preempt(self, data):
        seq = data.draw(st.sampled_from(self.sched.running))
        self.sched.preempt(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def stop_string(self, data):
        seq = data.draw(st.sampled_from(self.sched.running))
        assert self.sched.finish(seq, "stop", "###")
        self._collect()

    # --- checks -------------------------------------------------------------------------------
    @invariant()
    def pool_is_exact(self):
        for seq in self.sched.waiting:
            assert seq.block_table == [] and seq.num_computed_tokens == 0, seq
        self.bm.check_invariants(self.sched.running)
        owners = Counter(b for seq in self.sched.running for b in seq.block_table)
        assert [self.bm.ref_count(b) for b in range(NUM_BLOCKS)] == [owners[b] for b in range(NUM_BLOCKS)]
        assert self.bm.num_free_blocks == NUM_BLOCKS - len(owners)

    @invariant()
    def every_request_is_live_xor_reported(self):
        live = {s.request_id for s in self.sched.running + self.sched.waiting}
        assert len(live) == len(self.sched.running) + len(self.sched.waiting)
        assert not live & set(self.reported)
        assert live | set(self.reported) == set(self.added)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        rng = random.Random(0)
        for _ in range(500):
            if not self.sched.has_unfinished():
                break
            self._step(rng)
        assert not self.sched.has_unfinished(), "requests left unfinished: " + str(self.sched.waiting)
        for what in ("preempted by schedule", "chunked prefill"):
            event(f"{what}: {bool(self.seen[what])}")
        event(f"prefix hit: {self.bm.stats.prefix_cache_hits > 0}")
        assert set(self.reported) == set(self.added) and all(n == 1 for n in self.reported.values())
        assert self.bm.num_free_blocks == NUM_BLOCKS
        self.bm.check_invariants([])
        for seq in self.added.values():
            p = seq.sampling_params
            if seq.finish_reason == "length":
                assert seq.num_output_tokens == p.max_tokens or seq.num_tokens == MAX_MODEL_LEN
            elif seq.finish_reason == "stop" and seq.stop_reason is None:  # EOS
                assert seq.output_token_ids[-1] == EOS and not p.ignore_eos and seq.num_output_tokens >= p.min_tokens
            assert seq.num_output_tokens <= p.max_tokens

    # --- the fake engine step -----------------------------------------------------------------
    def _step(self, rng):
        cfg = self.sched.config
        out = self.sched.schedule()
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(self.sched.running) <= cfg.max_num_seqs
        self.seen["preempted by schedule"] += len(out.preempted)
        self.seen["chunked prefill"] += sum(1 for e in out.scheduled if not e.do_sample)
        kinds = [e.is_prefill for e in out.scheduled]
        assert kinds == sorted(kinds), "decodes must come first"
        assert len({id(e.seq) for e in out.scheduled}) == len(out.scheduled)
        for e in out.scheduled:
            seq = e.seq
            assert e.start == seq.num_computed_tokens and e.num_new_tokens >= 1
            assert e.start + e.num_new_tokens <= seq.num_tokens
            assert e.do_sample == (e.start + e.num_new_tokens == seq.num_tokens)
            assert e.slot_mapping == [seq.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                                      for p in e.positions]
            for slot, p in zip(e.slot_mapping, e.positions):  # the forward writes the new KV...
                self.kv[slot] = tuple(seq.token_ids[:p + 1])
        for e in out.scheduled:  # ...then attention reads the whole context
            seq = e.seq
            for p in range(e.context_len):
                slot = seq.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                assert self.kv.get(slot) == tuple(seq.token_ids[:p + 1]), (seq.request_id, p)
        commit(self.sched, out, [rng.randrange(VOCAB) for _ in out.sampled], eos=[EOS])
        self._collect()

    def _collect(self):
        for seq in self.sched.take_finished():
            assert seq.is_finished and seq.block_table == []
            self.reported[seq.request_id] += 1
            assert self.reported[seq.request_id] == 1, f"{seq.request_id} reported twice"


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=250, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
