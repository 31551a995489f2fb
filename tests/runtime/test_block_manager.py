"""Block manager: allocation, growth, prefix caching with verification, LRU eviction, stats.

Expected block ids and slots below are worked out by hand from the documented policy
(free list front first; freed plain blocks to the front, freed cached blocks to the back).
"""

import pytest

from fusecc.runtime import block_manager as bm_module
from fusecc.runtime.block_manager import BlockManager
from fusecc.runtime.sequence import Sequence

BS = 4


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), block_size=BS)


def compute(bm, s, n=None):
    """What a step does for `s`: slots for n tokens, then (after the model ran) commit them."""
    if s.block_table:
        n = s.num_tokens - s.num_computed_tokens if n is None else n
        bm.append_slots(s, n)
    else:
        n = s.num_tokens - bm.num_matched_tokens(s) if n is None else n
        bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(10, BS)
    a = seq(range(10))
    assert bm.can_allocate(a, 10)
    bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    assert [bm.ref_count(b) for b in a.block_table] == [1, 1, 1]
    bm.check_invariants([a])
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 10
    bm.check_invariants([])


def test_can_allocate_counts_blocks_for_requested_tokens_only():
    bm = BlockManager(2, BS)
    a = seq(range(20))  # 5 blocks' worth of prompt
    assert bm.can_allocate(a, 8) and not bm.can_allocate(a, 9)
    bm.allocate(a, 8)  # a chunk: 2 blocks
    assert bm.num_free_blocks == 0


def test_append_slots_grows_at_block_boundaries():
    bm = BlockManager(4, BS)
    a = seq(range(4))
    compute(bm, a)
    assert len(a.block_table) == 1
    a.append_token(99)  # position 4 starts a second block
    assert bm.can_append(a, 1)
    bm.append_slots(a, 1)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 2
    a.num_computed_tokens += 1
    a.append_token(98)
    bm.append_slots(a, 1)  # position 5: same block
    assert len(a.block_table) == 2
    bm.check_invariants([a])


def test_can_append_false_when_pool_exhausted():
    bm = BlockManager(1, BS)
    a = seq(range(4))
    compute(bm, a)
    a.append_token(7)
    assert not bm.can_append(a, 1)


def test_slot_mapping_follows_the_block_table():
    bm = BlockManager(4, BS)
    a = seq(range(7))
    a.block_table = [3, 1]  # hand-made table: positions 0-3 in block 3, 4-7 in block 1
    assert bm.slot_mapping(a, 2, 7) == [14, 15, 4, 5, 6]
    assert bm.slot_mapping(a, 5, 6) == [5] and bm.slot_mapping(a, 3, 3) == []


def test_slot_mapping_equals_the_per_position_formula():
    import random

    rng = random.Random(0)
    for bs in (1, 3, 16):
        bm = BlockManager(64, bs)
        a = seq(range(5))
        a.block_table = rng.sample(range(64), 10)
        for _ in range(50):
            start = rng.randrange(0, 10 * bs + 1)
            end = rng.randrange(start, 10 * bs + 1)
            assert bm.slot_mapping(a, start, end) == [a.block_table[p // bs] * bs + p % bs for p in range(start, end)]


def test_prefix_hit_shares_full_computed_blocks():
    bm = BlockManager(10, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "a")
    compute(bm, a)  # blocks: [1 2 3 4] [5 6 7 8] [9 10 . .]
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 50, 51, 52], "b")
    assert bm.num_matched_tokens(b) == 8
    bm.allocate(b, 3)
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 1]
    assert bm.stats.prefix_cache_queries == 10 + 11 and bm.stats.prefix_cache_hits == 8
    bm.check_invariants([a, b])


def test_uncomputed_blocks_are_not_shared():
    bm = BlockManager(10, BS)
    a = seq(range(8), "a")
    bm.allocate(a, 8)  # scheduled but the step has not run: no KV yet
    assert bm.num_matched_tokens(seq(range(9), "b")) == 0
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    assert bm.num_matched_tokens(seq(range(9), "b")) == 8


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(10, BS)
    a = seq(range(12), "a")
    compute(bm, a)
    # 12 tokens = 3 full cached blocks, but the last token's logits are needed: only 2 blocks hit.
    assert bm.num_matched_tokens(seq(range(12), "b")) == 8
    assert bm.num_matched_tokens(seq(range(13), "c")) == 12


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = seq(range(12), "a")
    compute(bm, a)
    assert bm.num_matched_tokens(seq(range(13), "b")) == 0


def test_chained_hash_requires_the_same_prefix():
    bm = BlockManager(10, BS)
    compute(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    # Second block equal, first block different: no hit at all.
    assert bm.num_matched_tokens(seq([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")) == 0


def test_hash_collision_is_caught_by_token_verification(monkeypatch):
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: 0)  # everything collides
    bm = BlockManager(10, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, a)
    assert bm.num_matched_tokens(seq([5, 5, 5, 5, 5], "b")) == 0
    assert bm.num_matched_tokens(seq([1, 2, 3, 4, 5], "c")) == 4
    bm.check_invariants([a])


def test_freed_cached_blocks_stay_findable_and_are_evicted_lru():
    bm = BlockManager(4, 2)
    a = Sequence("a", [1, 2, 3], block_size=2)
    compute(bm, a)  # takes blocks 0, 1; block 0 = (1, 2) cached
    bm.free(a)  # block 1 (plain) to the front, block 0 (cached) to the back: [1, 2, 3, 0]
    b = Sequence("b", [5, 6, 7], block_size=2)
    compute(bm, b)  # takes 1, 2; block 1 = (5, 6) cached
    bm.free(b)  # free list: [2, 3, 0, 1]
    assert bm.num_free_blocks == 4
    assert bm.num_matched_tokens(Sequence("q", [1, 2, 0], block_size=2)) == 2
    c = Sequence("c", [9, 9, 9, 9, 9, 9], block_size=2)
    bm.allocate(c, 6)  # takes 2, 3 and then 0: evicts a's block, the least recently freed
    assert c.block_table == [2, 3, 0] and bm.stats.num_evictions == 1
    assert bm.num_matched_tokens(Sequence("d", [1, 2, 0], block_size=2)) == 0
    e = Sequence("e", [5, 6, 0], block_size=2)
    assert bm.num_matched_tokens(e) == 2
    # Reviving a freed cached block takes it from the free list: 1 block left, and e needs it plus one more.
    assert not bm.can_allocate(e, 1)
    bm.free(c)
    bm.allocate(e, 1)
    assert e.block_table[0] == 1 and bm.ref_count(1) == 1
    bm.check_invariants([e])


def test_duplicate_content_keeps_one_indexed_copy():
    bm = BlockManager(10, BS)
    a, b = seq(range(9), "a"), seq(range(9), "b")
    bm.allocate(a, 9)
    bm.allocate(b, 9)  # same step: no hits yet, two copies of each block get computed
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.cache_full_blocks(s)
    bm.check_invariants([a, b])
    c = seq(range(10), "c")
    bm.allocate(c, 2)
    assert c.block_table[:2] == a.block_table[:2]  # the first indexed copy is the canonical one
    bm.free(a)
    bm.free(b)
    bm.check_invariants([c])


def test_usage_and_peak():
    bm = BlockManager(8, BS)
    a, b = seq(range(16), "a"), seq(range(100, 108), "b")
    bm.allocate(a, 16)
    bm.allocate(b, 8)
    assert bm.usage == pytest.approx(6 / 8)
    bm.free(a)
    assert bm.usage == pytest.approx(2 / 8) and bm.peak_usage == pytest.approx(6 / 8)


def test_invariant_checker_catches_corruption():
    bm = BlockManager(4, BS)
    a = seq(range(5))
    compute(bm, a)
    bm.check_invariants([a])
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_invariants([])  # a's blocks would be leaked
    bm.blocks[a.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_invariants([a])
    bm.blocks[a.block_table[0]].ref_count -= 1
    stolen = bm._free.popitem(last=False)[0]
    with pytest.raises(AssertionError, match="in free list"):
        bm.check_invariants([a])
    bm._free[stolen] = None
    twin = seq(range(5), "twin")
    twin.block_table = list(a.block_table)  # double ownership without ref counts
    with pytest.raises(AssertionError):
        bm.check_invariants([a, twin])


def test_write_into_a_shared_block_is_refused():
    bm = BlockManager(10, BS)
    a = seq(range(8), "a")
    compute(bm, a)
    b = seq(range(9), "b")
    bm.allocate(b, 1)
    b.num_computed_tokens = 4  # corrupt progress: position 4 lies in a shared block
    with pytest.raises(AssertionError, match="shared"):
        bm.append_slots(b, 1)
