"""The paged KV cache's bookkeeping: which block holds which tokens of which sequences.

The pool is `num_blocks` blocks of `block_size` token slots; slot `b * block_size + i` is token
slot i of block b (the model runner's KV tensors are `[num_blocks, block_size, kv_heads, head_dim]`
per layer, or any layout indexed by that slot number). Nothing here touches tensors.

Prefix caching: once every token of a full block has its KV in the cache, the block is indexed
by a chained hash of its content, `hash((parent_hash, tuple(block_tokens)))`, so the hash names
the whole prefix up to the block's end. A new sequence whose leading full blocks hash the same
shares those blocks (ref_count + 1) instead of computing them. Only full, computed blocks are
ever shared, and a sequence only writes at positions >= num_computed_tokens, so a shared block is
never written: no copy-on-write is needed. Python's `hash` of int tuples is deterministic within
a process (the cache never outlives it); a hit is still verified against the stored tokens and
parent hash, so a collision costs a miss, never wrong KV.

Freed blocks go back to one free list ordered for reuse: blocks without a hash at the front
(nothing to lose), freed hashed blocks at the back in LRU order. A freed hashed block stays
findable until it reaches the front and is taken for reuse (evicted). A sequence's blocks are
freed last-block-first, so a prefix's tail is evicted before its head: a chain is only useful
from its first block.

Check-then-act: the scheduler asks `can_allocate` / `can_append` and only then calls
`allocate` / `append_slots`, which assert they fit.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Iterable

from fusecc.runtime.sequence import Sequence


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    # Set while the block is in the prefix-cache index (full, computed, the canonical copy).
    hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class BlockManagerStats:
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache (at allocate)
    prefix_cache_hits: int = 0  # of which found cached
    num_evictions: int = 0  # cached blocks taken for reuse
    peak_used_blocks: int = 0


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [_Block(i) for i in range(num_blocks)]
        # Front = taken first. Values unused: an ordered set with O(1) removal of a hit block.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # chain hash -> block id
        self.stats = BlockManagerStats()

    # --- statistics -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out, including freed blocks still holding cached prefixes."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def peak_usage(self) -> float:
        return self.stats.peak_used_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.stats.prefix_cache_queries
        return self.stats.prefix_cache_hits / q if q else 0.0

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    # --- admission of a sequence that holds no blocks -----------------------------------------
    def num_matched_tokens(self, seq: Sequence) -> int:
        """Leading tokens of `seq` whose KV is already cached (a multiple of block_size)."""
        return len(self._match(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether the prefix hits plus blocks for `num_new_tokens` more tokens fit now."""
        hits = self._match(seq)
        num_new_blocks = seq.num_blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        # A hit on a freed cached block takes it out of the free list, like a new block.
        num_revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return num_new_blocks + num_revived <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` its prefix hits and blocks for `num_new_tokens` tokens after them.

        Sets seq.num_cached_tokens = seq.num_computed_tokens = the hit length. The caller
        computes num_new_tokens from `num_matched_tokens` (same result: nothing changes between).
        """
        assert not seq.block_table, f"{seq.request_id}: allocate on a sequence that holds blocks"
        assert seq.block_size == self.block_size
        hits = self._match(seq)
        num_cached = len(hits) * self.block_size
        assert 1 <= num_new_tokens <= seq.num_tokens - num_cached, (seq.request_id, num_new_tokens, num_cached)
        assert self.can_allocate(seq, num_new_tokens)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_cached_tokens = seq.num_computed_tokens = num_cached
        seq.num_hashed_blocks = len(hits)
        for _ in range(seq.num_blocks_needed(num_cached + num_new_tokens) - len(hits)):
            seq.block_table.append(self._take_free_block())
        self.stats.prefix_cache_queries += seq.num_tokens
        self.stats.prefix_cache_hits += num_cached
        self._note_peak()

    # --- growth of a sequence that holds blocks -----------------------------------------------
    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether slots for `num_new_tokens` tokens after seq.num_computed_tokens fit now."""
        return self._num_blocks_to_append(seq, num_new_tokens) <= len(self._free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to hold positions [num_computed_tokens, +num_new_tokens)."""
        table = seq.block_table
        assert table, f"{seq.request_id}: append_slots before allocate"
        num_new_blocks = self._num_blocks_to_append(seq, num_new_tokens)
        assert num_new_blocks <= len(self._free), (seq.request_id, num_new_blocks, len(self._free))
        for _ in range(num_new_blocks):
            table.append(self._take_free_block())
        # The blocks about to be written must be private: shared blocks are full and computed.
        first = seq.num_computed_tokens // self.block_size
        last = (seq.num_computed_tokens + num_new_tokens - 1) // self.block_size
        for block_id in table[first:last + 1]:
            assert self.blocks[block_id].ref_count == 1, f"{seq.request_id}: write into shared block {block_id}"
        if num_new_blocks:
            self._note_peak()

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Index the blocks of `seq` that became full and computed (after the step that computed them).
        Positions of pending tokens (async scheduling: a launched step is computing them, or their
        token is not read back) stay out: a block is hashed only once every token and KV in it is known."""
        if not self.enable_prefix_caching:
            return
        num_full = min((seq.num_computed_tokens - seq.num_pending_tokens) // self.block_size, len(seq.block_table))
        if num_full <= seq.num_hashed_blocks:  # the common decode step: no block became full
            return
        hashes = self._block_hashes(seq)
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            assert block.hash is None and block.ref_count == 1
            if hashes[i] in self._cached:
                # Same content computed twice (admitted before the first copy was indexed): the
                # indexed copy stays canonical, this one stays a plain block.
                continue
            block.hash = hashes[i]
            block.parent_hash = hashes[i - 1] if i else None
            block.token_ids = tuple(seq.block_token_ids(i))
            self._cached[block.hash] = block.block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Release all blocks of `seq` (finish, abort, preemption) and reset its KV progress."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"{seq.request_id}: double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_hashed_blocks = 0

    def release_unused_tail(self, seq: Sequence) -> None:
        """Free the blocks of `seq` past those holding its computed positions (speculative
        decoding appends blocks for draft tokens; rejected ones leave them unused). Such blocks
        were appended for positions >= num_computed_tokens, so they are private and unhashed."""
        keep = max(1, seq.num_blocks_needed(seq.num_computed_tokens))
        table = seq.block_table
        while len(table) > keep:
            block = self.blocks[table.pop()]
            assert block.ref_count == 1 and block.hash is None, (seq.request_id, block.block_id)
            block.ref_count = 0
            self._free[block.block_id] = None
            self._free.move_to_end(block.block_id, last=False)

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slot of each token position in [start, end) of `seq`."""
        bs, table = self.block_size, seq.block_table
        assert 0 <= start <= end <= len(table) * bs, (seq.request_id, start, end, len(table))
        if end - start == 1:
            return [table[start // bs] * bs + start % bs]
        # per block rather than per token: a prompt chunk is thousands of positions
        slots: list[int] = []
        p = start
        while p < end:
            block_end = min(end, (p // bs + 1) * bs)
            base = table[p // bs] * bs - (p // bs) * bs  # slot of position q in this block: base + q
            slots += range(base + p, base + block_end)
            p = block_end
        return slots

    # --- internals ----------------------------------------------------------------------------
    def _num_blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, seq.num_blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash is not None:
            assert self._cached[block.hash] == block_id
            del self._cached[block.hash]
            block.hash = block.parent_hash = None
            block.token_ids = ()
            self.stats.num_evictions += 1
        block.ref_count = 1
        return block_id

    def _block_hashes(self, seq: Sequence) -> list[int]:
        """Chained hashes of the full token blocks of `seq`, extended in place (tokens only append)."""
        hashes = seq.block_hashes
        for i in range(len(hashes), seq.num_full_blocks):
            hashes.append(chain_hash(hashes[i - 1] if i else None, tuple(seq.block_token_ids(i))))
        return hashes

    def _match(self, seq: Sequence) -> list[int]:
        # A request asking for prompt logprobs reads no cached prefix: those positions' logits
        # would never be computed (vLLM's skip_reading_prefix_cache). Its blocks are still cached.
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []
        # At least one token must be computed (its logits give the next token), so a prompt that
        # is entirely cached still recomputes its last block.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(seq)
        hits: list[int] = []
        for i in range(min(max_blocks, len(hashes))):
            block_id = self._cached.get(hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_hash != (hashes[i - 1] if i else None) or block.token_ids != tuple(seq.block_token_ids(i)):
                break
            hits.append(block_id)
        return hits

    def _note_peak(self) -> None:
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.num_used_blocks)

    def reset_peak(self) -> None:
        """Restart the peak-usage statistic from the current usage (e.g. after a warm-up)."""
        self.stats.peak_used_blocks = self.num_used_blocks

    # --- test support -------------------------------------------------------------------------
    def check_invariants(self, live_sequences: Iterable[Sequence]) -> None:
        """Raise AssertionError unless the pool is consistent with `live_sequences`, the sequences
        that hold blocks (all others must hold none): every block is free xor owned, ref counts
        equal the number of owners, the free list has no duplicates, the hash index is exact, and
        only indexed prefix blocks are shared."""
        owners: Counter[int] = Counter()
        for seq in live_sequences:
            table = seq.block_table
            _check(len(set(table)) == len(table), f"{seq.request_id}: a block twice in one table: {table}")
            _check(len(table) >= seq.num_blocks_needed(seq.num_computed_tokens),
                   f"{seq.request_id}: {seq.num_computed_tokens} computed tokens but {len(table)} blocks")
            _check(seq.num_hashed_blocks <= seq.num_computed_tokens // self.block_size,
                   f"{seq.request_id}: {seq.num_hashed_blocks} hashed blocks exceed its computed full blocks")
            owners.update(table)
            for i, block_id in enumerate(table):
                block = self.blocks[block_id]
                if block.ref_count > 1:
                    _check(i < seq.num_hashed_blocks and block.hash == seq.block_hashes[i],
                           f"{seq.request_id}: block {block_id} is shared but not an indexed prefix block")
                if block.hash is not None:
                    _check(i < seq.num_hashed_blocks and block.hash == seq.block_hashes[i],
                           f"{seq.request_id}: block {block_id} at index {i} carries a foreign hash")
        free_ids = list(self._free)
        _check(len(set(free_ids)) == len(free_ids), "a block is listed twice in the free list")
        free = set(free_ids)
        for block in self.blocks:
            _check(block.ref_count == owners[block.block_id],
                   f"block {block.block_id}: ref_count {block.ref_count} but {owners[block.block_id]} owners")
            _check((block.block_id in free) == (block.ref_count == 0),
                   f"block {block.block_id}: ref_count {block.ref_count} but in free list: {block.block_id in free}")
            if block.hash is not None:
                _check(self._cached.get(block.hash) == block.block_id,
                       f"block {block.block_id}: hash not indexed to it")
        for h, block_id in self._cached.items():
            _check(self.blocks[block_id].hash == h, f"index entry for block {block_id} does not match the block")
        _check(set(owners) <= set(range(self.num_blocks)), f"unknown block ids {set(owners) - set(range(self.num_blocks))}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)
