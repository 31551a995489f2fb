"""Speculative decoding: proposers (n-gram, draft model, layer skip), rejection-sampling verification
in one target forward, commit and KV rollback. Entry point: speculator.Speculator."""
