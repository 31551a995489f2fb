"""Tensor parallelism on torch.distributed (Megatron-style sharding of the native models).

    state.py       the process group: init_distributed, TPGroup (rank, size, group names)
    shard.py       the one weight-sharding rule: which rows / heads a rank holds
    collectives.py all-reduce / all-gather as functional collectives (they trace into compiled graphs)
    linear.py      ColumnParallelLinear (stacked parts: qkv, gate_up), RowParallelLinear
    vocab.py       VocabParallelEmbedding, ParallelLMHead
    sharding.py    shard_model: a built Llama-family model -> its rank's shard, loading HF tensors
    step_codec.py  a step as the changes since the last one (what the ranks receive), and back
    worker.py      one rank: builds its shard and ModelRunner, runs the steps rank 0 broadcasts
    executor.py    the engine's side: spawns the workers (or drives them under torchrun), faults
"""
