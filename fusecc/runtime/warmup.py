"""Compile every graph a step can hit before the first request (vLLM compiles at start-up too).

    shapes = warmup_shapes(config, max_blocks_per_seq)    # [(query lengths, context lengths), ...]
    runner.warmup()                                        # one dummy forward per shape

The forward is compiled with dynamic=True, so a graph serves all sizes of a dimension, except
that Dynamo specialises sizes 0 and 1: a step with 1 token, 1 sequence or a 1-block-wide block
table compiles its own graph, and so does each value of AttentionMetadata.decode_only. The shapes
below cover every combination a step can produce: decode-only steps (q = 1 per sequence) and
mixed steps (some sequence computes >= 2 tokens), each with 1 and several sequences and block
tables 1 and several blocks wide, plus a wider prefill so that kernels specialised on a
multiple-of-16 length are built too, and one prefill per autotune class of the attention kernels
(kernels/attention_tile.py:TUNING_CLASSES) that a step can reach. The dummy forwards write no KV (slot -1), never call the
sampler (whose seed stream stays untouched) and allocate no blocks.

With `size_oblivious` (the CPU runner compiles with fx's backed_size_oblivious, so no size is
specialised to 0 or 1) only decode_only tells graphs apart: two shapes, each with several
sequences, tokens and block-table columns, so that no dimension is traced at size 1."""

from __future__ import annotations

from fusecc.kernels.attention_tile import TUNING_CLASSES, tuning_class
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.input_batch import cdiv


def warmup_shapes(config: EngineConfig, max_blocks_per_seq: int,
                  size_oblivious: bool = False) -> list[tuple[list[int], list[int]]]:
    """(new tokens per sequence, context length per sequence) of the dummy steps, deduplicated by
    what a graph specialises on, within the config's limits (sequences, token budget, lengths)."""
    bs, max_len = config.block_size, config.max_model_len
    seq_counts = sorted({1, 2, 3} & set(range(1, config.max_num_seqs + 1)))
    widths = sorted({1, 2, 3} & set(range(1, max_blocks_per_seq + 1)))
    patterns = []
    for b in reversed(seq_counts) if size_oblivious else seq_counts:  # most general shape first
        patterns += [[1] * b, [2] * b, [3] + [2] * (b - 1), [1] * (b - 1) + [2], [16] + [1] * (b - 1)]
    longest = min(config.max_num_batched_tokens, max_len - 1)  # new tokens of one sequence in a step
    patterns += [[min(c, longest)] for c in TUNING_CLASSES]
    shapes, seen = [], set()
    for q in patterns:
        if sum(q) > config.max_num_batched_tokens or max(q) + 1 > max_len:
            continue
        for w in reversed(widths) if size_oblivious else widths:
            # the first sequence sets the table width; the others' contexts are their new tokens
            first = min(max(q[0], (w - 1) * bs + 1), max_len - 1)
            ctx = [first] + q[1:]
            key = (len(q) == sum(q), _bucket(len(q)), _bucket(sum(q)), _bucket(cdiv(max(ctx), bs)), _bucket(max(q)),
                   sum(q) % 16 == 0, tuning_class(max(q)))
            if size_oblivious:
                key = key[0]  # decode-only or mixed: the one thing the graphs still specialise on
            if key not in seen:
                seen.add(key)
                shapes.append((q, ctx))
    return shapes


def _bucket(n: int) -> int:
    return min(n, 2)  # Dynamo tells 0, 1 and "many" apart
