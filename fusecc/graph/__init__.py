"""Facts about FX graphs that every stage asks the same way: which nodes are views, impure or
random, who touches a storage (`node_kinds`); the compile-time constants a graph module holds
(`constants`); how ops are named and counted (`op_counts`). Passes, code generation and freezing
all import from here; nothing here imports them."""
