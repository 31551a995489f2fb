"""A torch profiler table of an engine's decode steps: where a decode step's time goes (GPU kernels
inside CUDA-graph replays included), for benchmarks whose figure misses its target."""

from __future__ import annotations


def profile_decode(engine, prompt: list[int], steps: int = 32, rows: int = 25) -> str:
    """One request of `prompt` through its prefill, then `steps` decode steps under the profiler;
    the kernels' table sorted by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    from fusecc.runtime.sampling_params import SamplingParams

    engine.add_request("profile", prompt, SamplingParams(max_tokens=steps, ignore_eos=True, temperature=0))
    engine.step()  # the prefill, outside the profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished_requests():
            engine.step()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
