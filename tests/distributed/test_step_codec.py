"""step_codec: what the ranks decode equals what the scheduler scheduled, step after step, through
chunked prefill, preemption (block tables reinstalled), prefix sharing, finished sequences
dropped and a request id reused; and the messages stay small (changes, not whole sequences).
The encoding's cases one by one, and the StepChannel that carries the messages to the ranks."""

import pickle
import random

from fusecc.distributed.step_codec import StepDecoder, StepEncoder, _derived
from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from fusecc.runtime.sequence import Sequence, SequenceStatus
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


def test_each_change_is_sent_once_and_lists_grow_by_their_appends():
    """The encoding's cases, one attribute each: appends to the same list travel as the new entries;
    a list replaced, shrunk or rewritten at its last sent entry travels whole; a scalar travels when its
    value changes (an equal new object does not); any other value when it is another object; cached
    properties never (each replica computes its own)."""
    seq = Sequence("a", [5, 6, 7], SamplingParams(seed=3), block_size=4)
    seq.prompt_token_array  # a cached_property, computed on the engine side
    encoder, decoder = StepEncoder(), StepDecoder()

    def step():
        out = SchedulerOutput(scheduled=[ScheduledSequence(seq, seq.num_computed_tokens, 1, False, True, [9])])
        message = encoder.encode(out, (2,))
        (replica_out, eos), = [decoder.decode(pickle.loads(pickle.dumps(message)))]
        replica = replica_out.scheduled[0].seq
        assert state(replica) == state(seq) and replica is not seq and eos == (2,)
        assert list(replica.prompt_token_array) == list(seq.prompt_token_array)
        (rid, new, sets, appends, *_), = message[0]
        return new, sets, appends

    new, sets, appends = step()
    assert new and not appends and sets["token_ids"] == [5, 6, 7] and "prompt_token_array" not in sets
    seq.token_ids += [8, 9]  # in place: the appends only
    seq.num_computed_tokens = 3
    assert step() == (False, {"num_computed_tokens": 3}, {"token_ids": [8, 9]})
    seq.num_computed_tokens = int("3")  # an equal value, another object
    assert step() == (False, {}, {})
    seq.block_table = [4]
    seq.status = SequenceStatus.RUNNING
    assert step() == (False, {"block_table": [4], "status": SequenceStatus.RUNNING}, {})
    seq.block_table.append(6)
    seq.block_table[0] = 5  # its last sent entry rewritten: the list travels whole
    assert step() == (False, {"block_table": [5, 6]}, {})
    del seq.token_ids[-1]
    assert step() == (False, {"token_ids": [5, 6, 7, 8]}, {})
    seq.sampling_params = SamplingParams(seed=4)  # not a scalar: sent when it is another object
    assert step()[1] == {"sampling_params": seq.sampling_params}
    seq.status = SequenceStatus.FINISHED_LENGTH
    step()
    assert encoder.encode(SchedulerOutput(scheduled=[]), ())[1] == ["a"]  # finished, not scheduled: dropped
    assert not encoder._sent


def _channel_body(tp, messages):
    """Rank 0 sends `messages` then None; the others return what they received."""
    from fusecc.distributed.worker import StepChannel

    channel = StepChannel(tp, capacity=256)
    if tp.rank == 0:
        for message in messages:
            channel.send(message)
        channel.send(None)
        channel.flush()
        return None
    received = []
    while (message := channel.receive()) is not None:
        received.append(message)
    return received


def test_the_step_channel_delivers_every_message_in_order():
    """One buffer a step; a message past its capacity sends its rest as a second collective."""
    from tests.distributed.ranks import run_ranks

    messages = [([("r", True, {"token_ids": list(range(n))}, {})], [], (2,)) for n in (1, 200, 0, 3000, 5)]
    assert len(pickle.dumps(messages[3])) > 256 > len(pickle.dumps(messages[0]))
    assert run_ranks(_channel_body, world=3, args=(messages,)) == [None, messages, messages]
    assert run_ranks(_channel_body, world=1, args=(messages,)) == [None]  # rank 0 alone: nothing to send to
