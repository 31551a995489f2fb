"""Engine arguments: EngineConfig's fields are the one definition of the CLI flags and the kwargs."""

import argparse
import dataclasses

import pytest

from fusecc.runtime.config import EngineConfig
from fusecc.runtime.engine_args import add_engine_args, check_engine_kwargs, engine_kwargs_from_cli, parse_token_count


def parser():
    p = argparse.ArgumentParser(prog="t")
    add_engine_args(p.add_argument_group("engine"))
    return p


def test_every_field_has_help_and_a_flag():
    p = parser()
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    for f in dataclasses.fields(EngineConfig):
        assert f.metadata.get("help"), f.name
        action = flags[f.name]
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert action.default is None  # only flags the user gave are passed on
        # the field's default, or, where None means something, the help's own words for it
        assert f"(default: {f.default})" in action.help or f.default is None and "(default: " in action.help
        assert action.help.count("default: ") == 1, action.help
    text = p.format_help()
    assert "--enable-prefix-caching, --no-enable-prefix-caching" in text
    assert "--enforce-eager, --no-enforce-eager" in text


def test_only_given_flags_are_passed_on_and_round_trip():
    p = parser()
    assert engine_kwargs_from_cli(p.parse_args([])) == {}
    args = p.parse_args(["--max-model-len", "2K", "--max-num-seqs", "8", "--no-enable-prefix-caching",
                         "--enforce-eager", "--dtype", "float32", "--gpu-memory-utilization", "0.5",
                         "--seed", "none", "--tokenizer", "/tmp/tok", "--speculative-config", '{"method": "ngram"}'])
    kwargs = engine_kwargs_from_cli(args)
    assert kwargs == dict(max_model_len=2048, max_num_seqs=8, enable_prefix_caching=False, enforce_eager=True,
                          dtype="float32", gpu_memory_utilization=0.5, seed=None, tokenizer="/tmp/tok",
                          speculative_config={"method": "ngram"})
    check_engine_kwargs(kwargs)
    config = EngineConfig(**kwargs)
    assert config.max_model_len == 2048 and not config.enable_prefix_caching and config.seed is None


@pytest.mark.parametrize("text,value", [("2048", 2048), ("2k", 2000), ("2K", 2048), ("4K", 4096), ("32k", 32000),
                                        ("1M", 2**20), ("1m", 10**6), ("1.5k", 1500), (" 8K ", 8192)])
def test_token_counts_follow_vllm(text, value):
    assert parse_token_count(text) == value
    assert engine_kwargs_from_cli(parser().parse_args(["--max-num-batched-tokens", text])) == \
        {"max_num_batched_tokens": value}


@pytest.mark.parametrize("text", ["1.5K", "k", "2x", "-1", ""])
def test_bad_token_counts_are_usage_errors(text, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--max-model-len", text])
    assert "--max-model-len" in capsys.readouterr().err


def test_unknown_argument_lists_the_valid_ones():
    with pytest.raises(TypeError) as e:
        check_engine_kwargs({"max_len": 3})
    msg = str(e.value)
    assert msg.startswith("unknown engine argument 'max_len'; valid engine arguments: ")
    assert all(f.name in msg for f in dataclasses.fields(EngineConfig))


@pytest.mark.parametrize("kwargs,field", [(dict(max_model_len="4k"), "max_model_len"),
                                          (dict(enforce_eager=1), "enforce_eager"),
                                          (dict(max_num_seqs=True), "max_num_seqs"),
                                          (dict(seed=1.5), "seed"), (dict(dtype=16), "dtype")])
def test_badly_typed_values_name_the_field(kwargs, field):
    with pytest.raises(TypeError, match=rf"EngineConfig\.{field} must be"):
        check_engine_kwargs(kwargs)
    with pytest.raises(TypeError, match=rf"EngineConfig\.{field} must be"):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [(dict(dtype="fp8"), "dtype"), (dict(device="tpu"), "device"),
                                          (dict(model_impl="vllm"), "model_impl"),
                                          (dict(quantization="q3"), "quantization"),
                                          (dict(kv_cache_dtype="fp16"), "kv_cache_dtype")])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"EngineConfig\.{field}\b"):
        EngineConfig(**kwargs)


def test_speculation_with_tensor_parallelism_is_refused_when_the_engine_is_built():
    from fusecc.runtime.engine import LLMEngine

    kwargs = dict(tensor_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    EngineConfig(**kwargs)  # a config may hold them; building an engine refuses them
    with pytest.raises(ValueError, match=r"^speculative_config with tensor_parallel_size > 1 is not supported yet"):
        LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=64, **kwargs)


def test_dtype_auto_follows_the_checkpoint(tmp_path):
    import torch

    from fusecc.runtime.engine import LLMEngine
    from tests.runtime.hf_checkpoints import save_tiny_checkpoint

    save_tiny_checkpoint("llama", tmp_path)
    engine = LLMEngine.from_engine_args(str(tmp_path), enforce_eager=True, max_model_len=64)
    assert engine.runner.dtype == torch.float32 and engine.config.dtype == "auto"
    half = LLMEngine.from_engine_args(str(tmp_path), enforce_eager=True, max_model_len=64, dtype="bfloat16")
    assert half.runner.dtype == torch.bfloat16
    assert LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=64,
                                      dtype=torch.float16).runner.dtype == torch.float16
