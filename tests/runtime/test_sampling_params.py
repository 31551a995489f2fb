import pytest

from fusecc.runtime.config import EngineConfig
from fusecc.runtime.sampling_params import SamplingParams


def test_defaults_are_valid_and_sampling():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.stop, p.stop_token_ids) == (1, 1.0, 1.0, 16, [], [])
    assert not p.is_greedy and not p.top_k_enabled


@pytest.mark.parametrize("temperature, greedy", [(0.0, True), (1e-7, True), (0.01, False), (2.0, False)])
def test_temperature_zero_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


@pytest.mark.parametrize("top_k, enabled", [(-1, False), (0, False), (1, True), (50, True)])
def test_top_k_off_values(top_k, enabled):
    assert SamplingParams(top_k=top_k).top_k_enabled is enabled


def test_stop_accepts_a_string_or_none():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(n=0), "n"),
    (dict(stop=[str(i) for i in range(17)]), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(seed=1.5), "seed"),
    (dict(top_k=True), "top_k"),        # bool is an int subclass: it passed, then crashed the engine step
    (dict(logprobs=True), "logprobs"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_boundary_values_are_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0,
                   stop=[str(i) for i in range(16)], min_tokens=10, max_tokens=10, logprobs=20, seed=-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=0), "block_size"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_model_len=1), "max_model_len"),
    (dict(max_num_batched_tokens=100, max_num_seqs=256), "max_num_batched_tokens"),
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=2048, max_model_len=4096), "max_num_batched_tokens"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.01), "gpu_memory_utilization"),
    (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(max_waiting=0), "max_waiting"),
])
def test_engine_config_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"EngineConfig\.{field}\b"):
        EngineConfig(**kwargs)


def test_engine_config_defaults():
    c = EngineConfig()
    assert (c.block_size, c.max_num_seqs, c.max_num_batched_tokens, c.num_kv_blocks) == (16, 256, 8192, None)
    assert c.enable_prefix_caching and c.enable_chunked_prefill
    EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=4096, max_model_len=4096)
