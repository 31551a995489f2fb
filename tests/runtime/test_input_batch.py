"""prepare_inputs and BlockTableMirror against the straightforward per-sequence construction."""

import random

import torch

from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.input_batch import BlockTableMirror, cdiv, cpu_tensor, prepare_inputs
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import Scheduler
from fusecc.runtime.sequence import Sequence
from tests.runtime.scheduling import commit


def reference_inputs(entries, block_size):
    """The runner's inputs built entry by entry, as the runner did before input_batch existed."""
    token_ids, positions, slots, cu = [], [], [], [0]
    for e in entries:
        table = e.seq.block_table
        token_ids += e.seq.token_ids[e.start:e.start + e.num_new_tokens]
        positions += range(e.start, e.start + e.num_new_tokens)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(e.start, e.context_len)]
        cu.append(cu[-1] + e.num_new_tokens)
    context_lens = [e.context_len for e in entries]
    width = max(cdiv(c, block_size) for c in context_lens)
    tables = [e.block_table[:width] + [0] * (width - len(e.block_table[:width])) for e in entries]
    return dict(token_ids=token_ids, positions=positions, slot_mapping=slots, context_lens=context_lens,
                cu_seqlens_q=cu, block_tables=tables,
                sample_rows=[cu[i + 1] - 1 for i, e in enumerate(entries) if e.do_sample],
                max_seqlen_q=max(e.num_new_tokens for e in entries),
                decode_only=len(token_ids) == len(entries), num_decodes=sum(not e.is_prefill for e in entries))


def assert_inputs_equal(inputs, ref):
    for name in ("token_ids", "positions", "slot_mapping", "context_lens", "cu_seqlens_q"):
        assert list(getattr(inputs, name)) == ref[name], name
    for name in ("max_seqlen_q", "decode_only", "num_decodes"):
        assert getattr(inputs, name) == ref[name], name
    assert inputs.block_tables.dtype == torch.int32
    assert inputs.block_tables.tolist() == ref["block_tables"]
    rows = list(range(len(ref["token_ids"]))) if inputs.sample_rows is None else inputs.sample_rows
    assert rows == ref["sample_rows"] and inputs.num_sampled == len(ref["sample_rows"])


def test_prepare_inputs_matches_reference_through_preemption_chunking_and_aborts():
    kinds = [_check_workload(seed) for seed in range(6)]
    assert all(k["decode"] and k["prefill"] for k in kinds) and sum(k["preempted"] for k in kinds), kinds


def _check_workload(seed: int) -> dict:
    """Random requests through a Scheduler on a small pool; every step's inputs checked."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    max_num_seqs = rng.choice([1, 3, 8])
    config = EngineConfig(block_size=bs, max_num_seqs=max_num_seqs, max_num_batched_tokens=rng.choice([8, 16, 64]),
                          max_model_len=48, enable_prefix_caching=rng.random() < 0.5)
    bm = BlockManager(cdiv(48, bs) + rng.randrange(0, 40), bs, config.enable_prefix_caching)
    sched = Scheduler(config, bm)
    # rows == max_num_seqs: the fewest allowed, so rows are recycled often
    mirror = BlockTableMirror(max_num_seqs, cdiv(48, bs))
    shared = [rng.randrange(1, 9) for _ in range(12)]
    kinds = {"decode": 0, "prefill": 0, "preempted": 0}
    for i in range(40):
        prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(1, 9) for _ in range(rng.randrange(1, 30))]
        sched.add(Sequence(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 12), ignore_eos=True),
                           block_size=bs, arrival_time=float(i)))
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        kinds["preempted"] += len(out.preempted)
        if out.scheduled:
            kinds["prefill" if out.scheduled[-1].is_prefill else "decode"] += 1
            assert_inputs_equal(prepare_inputs(out.scheduled, mirror, bs), reference_inputs(out.scheduled, bs))
        commit(sched, out, [rng.randrange(1, 9) for _ in out.sampled], eos=[0])
        if rng.random() < 0.05 and sched.running:
            sched.abort(rng.choice(sched.running).request_id)
        sched.take_finished()
    assert not sched.has_unfinished()
    return kinds


def test_block_table_mirror_follows_appends_new_tables_and_recycles_rows():
    rng = random.Random(0)

    class Seq:  # what the mirror reads: a block_table list
        def __init__(self):
            self.block_table = []

    seqs = [Seq() for _ in range(10)]
    mirror = BlockTableMirror(num_rows=4, max_blocks=12)
    for _ in range(500):
        for s in seqs:
            r = rng.random()
            if r < 0.1:
                s.block_table = []  # BlockManager.free installs a new list
            elif r < 0.2:
                s.block_table = [rng.randrange(100) for _ in range(rng.randrange(1, 12))]  # allocate
            elif r < 0.5 and len(s.block_table) < 12:
                s.block_table.append(rng.randrange(100))
            elif r < 0.52 and s.block_table:
                s.block_table[-1] = rng.randrange(100)  # not something BlockManager does; still caught
        batch = rng.sample(seqs, rng.randrange(1, 5))
        width = rng.randrange(max(len(s.block_table) for s in batch), 13) or 1
        got = mirror.gather(mirror.rows(batch), width)
        assert got.tolist() == [s.block_table + [0] * (width - len(s.block_table)) for s in batch]


def test_gather_returns_a_fresh_tensor():
    class Seq:
        block_table = [3, 1]

    mirror = BlockTableMirror(2, 4)
    seq = Seq()
    got = mirror.gather(mirror.rows([seq]), 2)
    got[0, 0] = 99
    assert mirror.gather(mirror.rows([seq]), 2).tolist() == [[3, 1]]


def test_cpu_tensor():
    assert cpu_tensor([1, -1, 2**40], torch.int64).tolist() == [1, -1, 2**40]
    assert cpu_tensor([], torch.int32).shape == (0,) and cpu_tensor([], torch.int32).dtype == torch.int32
    assert cpu_tensor(range(3), torch.int32).dtype == torch.int32
