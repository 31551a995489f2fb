"""Engine options: one dataclass, the one definition of every engine argument.

    config = EngineConfig(max_model_len=2048, num_kv_blocks=512)
    config = dataclasses.replace(config, max_model_len=1024)   # re-validated

Each field's `metadata["help"]` is the text users read (`fusecc-serve --help`, built by
fusecc/runtime/engine_args.py); `LLM(**kwargs)` and `LLMEngine.from_engine_args(**kwargs)` take
exactly these names. The model runner resolves what depends on the model and the device (the KV
pool size from `gpu_memory_utilization` when `num_kv_blocks` is None, and may lower
`max_model_len` to the model's context length with `dataclasses.replace`); the scheduler and
block manager only read it. The pool's peak usage is `LLMEngine.stats().peak_kv_cache_usage`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field

from fusecc.quantization.config import QUANTIZATION_METHODS

# vLLM's --dtype names; "auto" = the checkpoint's torch_dtype (bf16 on CUDA / fp32 on CPU without one)
DTYPE_NAMES = ("auto", "half", "float16", "bfloat16", "float", "float32")
DEVICE_NAMES = ("auto", "cuda", "cpu")
# vLLM's --kv-cache-dtype names: "auto" = the model's dtype; "fp8" = "fp8_e4m3" (float8_e4m3fn)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class EngineConfig:
    # --- model and device ---------------------------------------------------------------------
    dtype: str = _f("auto", "Weights and activations dtype: auto (the checkpoint's torch_dtype from config.json; "
                            "bfloat16 on CUDA, float32 on CPU when it names none), half/float16, bfloat16, "
                            "float/float32.")
    device: str = _f("auto", "Where the model runs: auto (cuda when available, else cpu), cuda, cuda:N or cpu.")
    tokenizer: str | None = _f(None, "Tokenizer folder (Hugging Face layout) (default: the model folder).")
    enforce_eager: bool = _f(False, "Run the model eagerly: no torch.compile and no CUDA graphs (fastest start, "
                                    "slowest decode).")
    seed: int | None = _f(0, "Seed of the sampler's generator for requests without their own seed; "
                             "None = nondeterministic.")
    generation_config: str = _f("auto", "Default sampling parameters: auto (the model's generation_config.json), "
                                        "vllm or none (ignore it: SamplingParams defaults), or a folder holding a "
                                        "generation_config.json.")
    model_impl: str = _f("auto", "Model implementation: fusecc (fusecc's own model classes), transformers "
                                 "(transformers' modeling code with fusecc's paged attention, for any decoder "
                                 "without a fusecc class) or auto (fusecc when it has the architecture).")
    quantization: str | None = _f(None, "Weight quantization. A checkpoint whose config.json has a "
                                        "quantization_config (awq, gptq, fp8) is detected and needs none. "
                                        "On the fly, from a float checkpoint: int8 (W8A16, per-channel), int4 "
                                        "(W4A16, group 128, asymmetric) or fp8 (W8A8 e4m3, per-channel weights, "
                                        "per-token activations; GPUs with compute capability 8.9+). awq/gptq/fp8 "
                                        "may also name the checkpoint's own method. See README 'Quantization'.")
    # --- scheduling and the KV cache ----------------------------------------------------------
    block_size: int = _f(16, "Tokens per KV-cache block. Prefix caching shares whole blocks only, so smaller "
                             "blocks share more of a common prefix but cost longer block tables.")
    max_num_seqs: int = _f(256, "Sequences in the running batch (prefills and decodes together) at most.")
    max_num_batched_tokens: int = _f(8192, "The per-step token budget: new tokens (prompt chunks + one per decode) "
                                           "computed by one forward pass. Bounds activation memory and the latency "
                                           "of a step. Accepts 8k (8000) or 8K (8192).", token_count=True)
    max_model_len: int = _f(4096, "Prompt + generated tokens of one sequence at most (lowered to the model's "
                                  "context length). A sequence reaching it finishes with reason 'length'; a prompt "
                                  "that leaves no room for one generated token is rejected. Accepts 4k (4000) or "
                                  "4K (4096).", token_count=True)
    enable_prefix_caching: bool = _f(True, "Reuse the KV of full blocks whose token prefix was seen before (shared "
                                           "system prompts, recompute after preemption).")
    enable_chunked_prefill: bool = _f(True, "Split prompts longer than the remaining token budget over several "
                                            "steps, so a long prompt neither stalls running decodes nor needs "
                                            "max_num_batched_tokens >= max_model_len.")
    async_scheduling: bool = _f(False, "Overlap the host's work for the next step (scheduling, input preparation, "
                                       "detokenization, outputs) with the device running this one (vLLM's async "
                                       "scheduling): a decode step is launched before the previous step's tokens "
                                       "are read back, its input ids taken on the device from the previous step's "
                                       "samples. For decode steps whose rows are all plain greedy; other steps, "
                                       "speculative decoding and tensor parallelism run as without it. Outputs "
                                       "come one step later (fusecc/runtime/async_scheduling.py).")
    gpu_memory_utilization: float = _f(0.9, "Fraction of total GPU memory the engine may use (weights + activations "
                                            "+ KV pool); the KV pool gets what is left after a profiling forward "
                                            "pass.")
    num_kv_blocks: int | None = _f(None, "KV pool size in blocks (vLLM's num_gpu_blocks_override). Each block "
                                         "holds block_size tokens of K and V for every layer; the pool must hold one "
                                         "max_model_len sequence. (default: sized from free memory "
                                         "(gpu_memory_utilization) on CUDA, 512 blocks on CPU)")
    max_waiting: int = _f(4096, "Admission control: a request that would make more than this many sequences wait "
                                "is refused with SchedulerFullError (the server answers HTTP 429).")
    # --- parallelism, quantization and speculation (vLLM's names) --------------------------------
    tensor_parallel_size: int = _f(1, "GPUs (processes) to shard the model over: one worker process per rank, "
                                      "Megatron-style tensor parallelism (native Llama-family models; see the "
                                      "README's 'Tensor parallelism').")
    kv_cache_dtype: str = _f("auto", "KV cache dtype: auto (the model's dtype) or fp8 / fp8_e4m3 (e4m3 with "
                                     "per-layer K and V scales, 1.0 unless the checkpoint gives k_scale/v_scale: "
                                     "twice the tokens in the same memory; CUDA GPUs with compute capability "
                                     "8.9+, or CPU). See README 'Quantization'.")
    speculative_config: str | dict | None = _f(None, "Speculative decoding (vLLM's keys), a dict or JSON, e.g. "
                                                     "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}', "
                                                     "'{\"model\": DIR, \"num_speculative_tokens\": 3}' or "
                                                     "'{\"method\": \"layer_skip\", \"num_layers\": 8, "
                                                     "\"num_speculative_tokens\": 3}' "
                                                     "(fusecc/runtime/spec_decode/config.py).")

    def __post_init__(self) -> None:
        hints = _field_types()
        for f in dataclasses.fields(self):
            check_field_type(f.name, getattr(self, f.name), hints[f.name])
        _require(self.dtype in DTYPE_NAMES, "dtype", self.dtype, f"must be one of {DTYPE_NAMES}")
        _require(self.device in DEVICE_NAMES or self.device.startswith("cuda:"), "device", self.device,
                 "must be auto, cuda, cuda:N or cpu")
        _require(self.model_impl in ("auto", "fusecc", "transformers"), "model_impl", self.model_impl,
                 "must be auto, fusecc or transformers")
        _require(bool(self.generation_config), "generation_config", self.generation_config,
                 "must be auto, vllm or a folder")
        _require(self.block_size >= 1, "block_size", self.block_size, "must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        _require(self.max_model_len >= 2, "max_model_len", self.max_model_len,
                 "must be >= 2 (one prompt token and one generated token)")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 self.max_num_batched_tokens, "must be >= 1")
        # Every running sequence must be able to decode in the same step, or some decodes would
        # be skipped each step for no reason.
        _require(self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens",
                 self.max_num_batched_tokens, f"must be >= max_num_seqs ({self.max_num_seqs})")
        if not self.enable_chunked_prefill:
            # Without chunking a whole prompt must fit in one step's budget, or it waits forever.
            _require(self.max_num_batched_tokens >= self.max_model_len, "max_num_batched_tokens",
                     self.max_num_batched_tokens,
                     f"must be >= max_model_len ({self.max_model_len}) when enable_chunked_prefill is False")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 self.gpu_memory_utilization, "must be in (0, 1]")
        if self.num_kv_blocks is not None:
            _require(self.num_kv_blocks >= 1, "num_kv_blocks", self.num_kv_blocks, "must be >= 1 or None")
        _require(self.max_waiting >= 1, "max_waiting", self.max_waiting, "must be >= 1")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
                 f"must be one of {', '.join(KV_CACHE_DTYPES)}")
        _require(self.quantization is None or self.quantization in QUANTIZATION_METHODS, "quantization",
                 self.quantization, f"must be one of {', '.join(QUANTIZATION_METHODS)} or None")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, "must be >= 1")

    def check_supported(self) -> None:
        """Checks that need more than the field itself (the speculative config's parse, combinations
        not supported together): run when an engine is built, not on construction, so that a config
        can be described and printed whatever it holds."""
        if self.speculative_config is not None:
            from fusecc.runtime.spec_decode.config import SpeculativeConfig

            SpeculativeConfig.parse(self.speculative_config)
            if self.tensor_parallel_size > 1:
                raise ValueError("speculative_config with tensor_parallel_size > 1 is not supported yet")


@functools.cache
def _field_types() -> dict[str, object]:
    return typing.get_type_hints(EngineConfig)


def check_field_type(name: str, value: object, annotation) -> None:
    """TypeError naming the field when `value` is not of its annotated type (bool is not an int;
    an int is a float)."""
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _UnionType) \
        else (annotation,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind in (str, dict) and isinstance(value, kind):
            return
    names = " | ".join("None" if k is type(None) else k.__name__ for k in allowed)
    raise TypeError(f"EngineConfig.{name} must be {names}, got {type(value).__name__} {value!r}")


_UnionType = type(int | None)


def _require(ok: bool, name: str, value: object, what: str) -> None:
    if not ok:
        raise ValueError(f"EngineConfig.{name} {what}, got {value!r}")
