"""Shared by the prefill-kernel tests: which kernel flash_attention launched, on NaN-poisoned outputs."""

import sys

import torch

from fusecc.kernels import flash_attention


def record_launches(monkeypatch, launcher: str, run_on_cpu: bool) -> list:
    """Wrap fusecc.kernels.attention_routing.<launcher> (launch_tma_prefill, launch_gluon_prefill) so
    each launch is recorded as (q shape, causal). On a GPU, and on CPU when `run_on_cpu` (the
    interpreter can run it), the kernel runs; otherwise the output is zero-filled instead."""
    calls = []
    flash_module = sys.modules["fusecc.kernels.attention_routing"]  # the package exports the function
    real = getattr(flash_module, launcher)
    runs = torch.cuda.is_available() or run_on_cpu

    def counted(q, k, v, out, causal, qk_scale):
        calls.append((tuple(q.shape), causal))
        if runs:
            return real(q, k, v, out, causal, qk_scale)
        out.zero_()

    monkeypatch.setattr(flash_module, launcher, counted)
    return calls


def poisoned_run(q, k, v, causal, **kwargs):
    """flash_attention into a NaN-filled output, so an element the kernel never writes shows."""
    out = torch.full_like(q, float("nan"))
    flash_attention(q, k, v, causal=causal, out=out, **kwargs)
    return out
