"""The backend's graph cache in one process: Dynamo's caches are reset between compilations, so
the second compilation of a graph goes through the backend again and finds the stored entry."""

import warnings

import pytest
import torch

from fusecc.compile_cache import counters
from fusecc.compile_cache.location import graphs_dir


class Block(torch.nn.Module):
    """RMSNorm, then two linears of one activation (horizontal matmul fusion concatenates their
    frozen weights into a new constant) and a pointwise tail (a generated kernel)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = torch.nn.Parameter(torch.randn(64))
        self.q = torch.nn.Linear(64, 64, bias=False)
        self.k = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm
        return torch.nn.functional.silu(self.q(h)) * 2, self.k(h).sum(-1)


def compile_and_run(module, x, options):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend="fusecc", options=options)(x)
        return out, module(x)


def assert_close(out, ref):
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


OPTIONS = {"freeze": True, "codegen": "triton", "strict": True}


def test_stored_wrapper_and_kernels_run_with_the_weights_of_the_loading_module(compile_cache):
    x = torch.randn(4, 64)
    assert_close(*compile_and_run(Block(0), x, OPTIONS))
    assert counters["graph_stores"] == 1 and counters["codegen_runs"] == 1
    entry = next(graphs_dir().glob("*.fcc"))
    # the weights (64*64 + 32*64 + 64 floats, 25 KiB) and their concatenation are not in the
    # entry: both are recomputed from the module that loads it
    weight_bytes = sum(p.numel() * 4 for p in Block(0).parameters())
    assert entry.stat().st_size < weight_bytes, entry.stat().st_size
    # another instance with other weights and the same shapes: the same graph, loaded, computing
    # with these weights (the frozen constants come from the first call's inputs)
    out, ref = compile_and_run(Block(1), x, OPTIONS)
    assert counters["graph_hits"] == 1 and counters["codegen_runs"] == 1 and counters["aten_traces"] == 1
    assert_close(out, ref)


def test_corrupt_entry_is_discarded_with_a_warning_and_recompiled(compile_cache):
    x = torch.randn(3, 64)
    compile_and_run(Block(0), x, OPTIONS)
    entry = next(graphs_dir().glob("*.fcc"))
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the payload
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="discarding cache entry .*checksum mismatch"):
        out, ref = compile_and_run(Block(0), x, OPTIONS)
    assert_close(out, ref)
    assert counters["aten_traces"] == 2 and counters["graph_stores"] == 2 and counters["graph_hits"] == 0
    # rewritten whole: the next compilation loads it without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, ref = compile_and_run(Block(0), x, OPTIONS)
    assert counters["graph_hits"] == 1
    assert_close(out, ref)


def test_entry_that_does_not_load_is_discarded_and_recompiled(compile_cache):
    """A well-formed file whose contents this fusecc cannot load (written by another version)."""
    from fusecc.compile_cache.store import write_entry

    x = torch.randn(2, 64)
    compile_and_run(Block(0), x, OPTIONS)
    entry = next(graphs_dir().glob("*.fcc"))
    write_entry(graphs_dir(), entry.name[:-len(".fcc")], b"not a pickled artifact", "test")
    with pytest.warns(UserWarning, match="cannot be loaded"):
        out, ref = compile_and_run(Block(0), x, OPTIONS)
    assert_close(out, ref)
    assert counters["graph_discarded"] == 1 and counters["aten_traces"] == 2


def test_disabled_cache_reads_and_writes_nothing(compile_cache, monkeypatch):
    monkeypatch.setenv("FUSECC_DISABLE_COMPILE_CACHE", "1")
    compile_and_run(Block(0), torch.randn(2, 64), {"freeze": True})
    assert not graphs_dir().exists() and counters["graph_stores"] == 0 and counters["aten_traces"] == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_engine_restart_loads_its_graphs(compile_cache, device):
    """LLM() compiles its forward graph by graph ahead of time (size-oblivious on CPU: one per step
    kind, whatever the batch; on CUDA one per specialised shape class, CUDA graphs captured over
    them); a second engine loads them all, traces nothing, and generates the same tokens."""
    from torch._dynamo.utils import counters as dynamo_counters

    from fusecc import LLM, SamplingParams

    prompts, params = ["w3 w4 w5", "w6 w7 w8 w9 w10", "w11"], SamplingParams(temperature=0, max_tokens=6)
    engine_args = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, device=device)
    first = [o.outputs[0].token_ids for o in LLM(**engine_args).generate(prompts, params)]
    stored = counters["function_stores"]
    assert (stored == 2 if device == "cpu" else stored >= 2), dict(counters)
    assert counters["aten_traces"] == counters["graph_stores"] == stored, dict(counters)
    torch._dynamo.reset()
    counters.clear()
    dynamo_counters.clear()
    second = [o.outputs[0].token_ids for o in LLM(**engine_args).generate(prompts, params)]
    assert dict(counters) == {"function_hits": stored}
    assert dynamo_counters["stats"]["unique_graphs"] == 0
    assert second == first
