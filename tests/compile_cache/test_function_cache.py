"""fusecc.compile_cache.aot_compile in one process: guards it keeps, and where it steps aside."""

import logging

import torch

from fusecc.compile_cache import aot_compile, counters
import fusecc.compile_cache.function_cache as function_cache


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def scaled(model, x, double: bool):
    y = model(x)
    return y * 2 if double else y


def test_a_call_its_guards_reject_is_compiled_normally_and_correct(compile_cache, caplog):
    model, x = TwoLayers(), torch.randn(4, 16)
    with torch.no_grad():
        step = aot_compile(scaled, (model, x, True), options={"freeze": True})
        torch.testing.assert_close(step(model, x, True), scaled(model, x, True))
        assert counters["function_stores"] == 1
        # the Python flag is guarded (a value guard survives serialization): the other branch
        # is not served by the stored graph
        with caplog.at_level(logging.WARNING, logger="fusecc.compile_cache"):
            torch.testing.assert_close(step(model, x, False), scaled(model, x, False))
    assert "does not match the guards" in caplog.text
    # the stored function is loaded by a later call (as by a new process) and keeps the guard
    torch._dynamo.reset()
    with torch.no_grad():
        loaded = aot_compile(scaled, (model, x, True), options={"freeze": True})
        torch.testing.assert_close(loaded(model, x, False), scaled(model, x, False))
        torch.testing.assert_close(loaded(model, x, True), scaled(model, x, True))
    assert counters["function_hits"] == 1


def test_without_torch_support_it_logs_why_and_uses_torch_compile(compile_cache, monkeypatch, caplog):
    monkeypatch.setattr(function_cache, "missing_torch_support", lambda: "torch 2.x has no AOT compile")
    model, x = TwoLayers(), torch.randn(2, 16)
    with caplog.at_level(logging.WARNING, logger="fusecc.compile_cache"), torch.no_grad():
        step = aot_compile(scaled, (model, x, True))
        torch.testing.assert_close(step(model, x, True), scaled(model, x, True))
    assert "torch 2.x has no AOT compile; using torch.compile" in caplog.text
    assert counters["function_stores"] == 0 and counters["backend_calls"] == 1


def branches_on_batch(model, x):
    y = model(x)
    return y * 2 if x.shape[0] > 6 else y  # Dynamo guards the dynamic size: s0 > 6 or s0 <= 6


def test_dynamic_functions_are_found_by_shape_class_and_checked_by_their_guards(compile_cache):
    """dynamic=True: a stored function serves another size of the same class (a KV pool sized
    from free memory differs run to run); one whose guards reject the new size is not used, the
    call compiles anew under its exact shapes, and that entry is found next time."""
    model = TwoLayers()

    def fresh_process_call(batch):
        torch._dynamo.reset()
        x = torch.randn(batch, 16)
        with torch.no_grad():
            step = aot_compile(branches_on_batch, (model, x), options={"freeze": True}, dynamic=True)
            torch.testing.assert_close(step(model, x), branches_on_batch(model, x))
        seen = dict(counters)
        counters.clear()
        return seen

    assert fresh_process_call(9)["function_stores"] == 1
    assert fresh_process_call(12) == {"function_hits": 1}  # same class, guards accept: nothing traced
    # same class "n", the guard s0 > 6 rejects 5: compiled anew, stored under the exact shapes
    rejected = fresh_process_call(5)
    assert rejected["function_guard_rejects"] == 1 and rejected["function_stores"] == 1, rejected
    assert fresh_process_call(5) == {"function_guard_rejects": 1, "function_hits": 1}
    assert fresh_process_call(1)["function_misses"] == 1  # size 1 is its own class (Dynamo specialises it)
