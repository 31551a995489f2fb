"""step_codec: what the ranks decode equals what the scheduler scheduled, step after step, through
chunked prefill, preemption (block tables reinstalled), prefix sharing, finished sequences
dropped and a request id reused; and the messages stay small (changes, not whole sequences)."""

import pickle
import random

from fusecc.distributed.step_codec import StepDecoder, StepEncoder, _derived
from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import Scheduler
from fusecc.runtime.sequence import Sequence
from tests.runtime.scheduling import commit


def state(seq):
    return {k: v for k, v in vars(seq).items() if k not in _derived(type(seq))}


def test_decoded_steps_equal_the_scheduled_ones():
    config = EngineConfig(block_size=4, max_model_len=64, max_num_batched_tokens=16, max_num_seqs=4)
    sched = Scheduler(config, BlockManager(20, 4, True))  # 80 slots for 6 sequences of up to 64: preemption
    rng = random.Random(0)
    shared = [rng.randrange(3, 50) for _ in range(12)]

    def add(rid):
        prompt = shared + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 20))]
        sched.add(Sequence(rid, prompt, SamplingParams(max_tokens=rng.randrange(4, 30), seed=1), block_size=4))

    for i in range(6):
        add(str(i))
    encoder, decoder = StepEncoder(), StepDecoder()
    sizes, steps, reused = [], 0, False
    while sched.running or sched.waiting:
        out = sched.schedule()
        message = pickle.dumps(encoder.encode(out, (2,)))  # as it crosses the pipe and the broadcast
        sizes.append(len(message))
        decoded, eos = decoder.decode(pickle.loads(message))
        assert eos == (2,) and len(decoded.scheduled) == len(out.scheduled)
        for got, want in zip(decoded.scheduled, out.scheduled):
            assert (got.start, got.num_new_tokens, got.is_prefill, got.do_sample, got.slot_mapping) == (
                want.start, want.num_new_tokens, want.is_prefill, want.do_sample, want.slot_mapping)
            assert state(got.seq) == state(want.seq), want.seq.request_id
            assert got.token_ids == want.token_ids and got.seq.output_token_ids == want.seq.output_token_ids
        commit(sched, out, [2 if rng.random() < 0.03 else rng.choice([7, 9, 11]) for _ in out.sampled], eos=(2,))
        steps += 1
        if not reused and "0" not in {s.request_id for s in sched.running + list(sched.waiting)}:
            add("0")  # the id of a finished sequence comes back as a new one
            reused = True
    assert reused and sched.stats.num_preemptions > 0 and steps > 20
    assert not decoder._replicas or all(not s.is_finished for s in decoder._replicas.values())
    # the first message carries whole prompts; later ones grow by a token per sequence, not by history
    assert max(sizes[-10:]) < max(sizes[:3])
