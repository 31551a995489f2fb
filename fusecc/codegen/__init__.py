"""Code generation: the optimized ATen graph -> generated Triton kernels + a Python wrapper.

    fusion.py        groups of pointwise/reduction ops that become one kernel each
    lowerings.py     how each ATen op is written in Triton (or why it falls back)
    kernel_writer.py a group -> Triton source (sympy index math);  kernel_cache.py  compiled once
    wrapper.py       the call function that launches kernels and extern calls
    cudagraphs.py    mode="reduce-overhead": the wrapper replayed from CUDA graphs
    lower.py         the stage the backend calls: all of the above, or the ATen graph as it is

Code generation imports the passes' results (and the pass runner); passes never import it.
"""
