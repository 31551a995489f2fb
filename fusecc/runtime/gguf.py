"""A GGUF checkpoint (llama.cpp's one-file format) -> our model, its config and its tokenizer.

    model = "SmolLM2-135M-Instruct.Q4_1.gguf"     a .gguf file, or
    model = "folder/"                             a folder without config.json holding exactly one .gguf

The file holds everything: config (`llama.*` metadata), tokenizer and chat template
(`tokenizer.*`), and the weights, quantized or not. We read it through the `gguf` package and
transformers' GGUF conversion (`transformers.modeling_gguf_pytorch_utils`), the same code
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` runs, so names, the q/k row
permutation llama.cpp applies, and the config keys are transformers'. Decoder linears that are all
Q8_0 or all Q4_0 load into fusecc's int8/int4 formats unchanged (exact; fusecc/quantization/
gguf_blocks.py); every other quantized tensor (Q4_1, Q4_K, Q5_K, Q6_K, ...) is dequantized to the
model dtype at load. The weights then go through our native loader (`load_weights`), which stacks
q/k/v and gate/up as for a safetensors checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from pathlib import Path

import torch

GGUF_MAGIC = b"GGUF"
# general.architecture (after transformers renames llama -> mistral by name) -> what our registry loads
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# llama.cpp's end-of-generation tokens: generation stops at any of them
_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# llama.cpp's recommended sampling settings (general.sampling.*) -> SamplingParams fields
_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                  "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}


def gguf_file(model: str | Path) -> Path | None:
    """The GGUF file `model` names, or None when it is not one (a Hugging Face folder, or a path
    that does not exist: the folder loader reports those). ValueError for a file that is not
    GGUF and for a folder holding several .gguf files."""
    path = Path(model)
    if path.is_file():
        if not _is_gguf(path):
            raise ValueError(f"model {str(model)!r} is a file but not a GGUF file (no GGUF magic bytes); "
                             f"give a .gguf file or a Hugging Face checkpoint folder")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); "
                         f"name one, e.g. {files[0]}")
    if files and not _is_gguf(files[0]):
        raise ValueError(f"{files[0]} is not a GGUF file (no GGUF magic bytes)")
    return files[0] if files else None


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


class GGUFCheckpoint:
    """One GGUF file: its metadata is read once, here; the tensors when `load_model` runs."""

    def __init__(self, path: str | Path) -> None:
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"loading {Path(path).name} needs the gguf package: pip install 'fusecc[demo]'")
        self.path = Path(path)
        # the fast header reader first: a file we cannot run fails in a second, before the slow parse
        self.metadata, self._table, self._data_start = _read_header(self.path)
        types = self.tensor_types = {name: ggml_type for name, _, ggml_type, _ in self._table}
        arch = self.metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"{self.path.name}: GGUF architecture {arch!r} is not supported; "
                             f"supported: {', '.join(a for a in ARCHITECTURES if a != 'mistral')}")
        _check_tensor_types(self.path, types)
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        # {"config": ..., "tokenizer": ..., "tokenizer_config": ...}: transformers' reading of the metadata
        self.parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
        # dtype="auto" reads config.dtype: the file's float type when its weights are unquantized
        # half floats; quantized or fp32 files leave it unset (bf16 on CUDA, fp32 on CPU)
        self.config = self._config(_float_dtype(types))

    def _config(self, dtype: torch.dtype | None):
        from transformers import AutoConfig

        values = dict(self.parsed["config"])
        model_type = values["model_type"]
        if model_type not in ARCHITECTURES:
            raise ValueError(f"{self.path.name}: GGUF model type {model_type!r} is not supported; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        config = AutoConfig.for_model(**values)
        config.architectures = [ARCHITECTURES[model_type]]
        config.dtype = dtype
        return config

    def load_model(self, dtype: torch.dtype, device, max_positions: int | None = None,
                   quantization: str | None = None):
        """Our model for the file's architecture on `device` in `dtype`. Decoder linears that are all
        Q8_0 or all Q4_0 stay quantized (exact: fusecc/quantization/gguf_blocks.py) unless
        `quantization` names an on-the-fly method; every other tensor is dequantized."""
        from transformers import AutoModelForCausalLM

        from fusecc.quantization.gguf_blocks import gguf_quant_config
        from fusecc.runtime.loader import build_model
        from fusecc.runtime.models.registry import model_class

        cls = model_class(self.config)
        quant = gguf_quant_config(self.tensor_types) if quantization is None else None
        # transformers maps GGUF names (blk.N.attn_q.weight) to the parameter names of a model it is
        # given; a meta-device one costs no memory
        with torch.device("meta"):
            reference = AutoModelForCausalLM.from_config(self.config)
        return build_model(cls, self.config, dtype, device, max_positions, self._weights(reference, dtype, quant),
                           quant)

    def _weights(self, reference, dtype: torch.dtype, quant=None):
        """(transformers name, dequantized tensor) pairs, one tensor in memory at a time: the tensor
        loop of transformers' load_gguf_checkpoint(return_tensors=True), without parsing the
        metadata (the tokenizer's ~100k strings) a second time."""
        import numpy as np
        from gguf import dequantize

        from fusecc.quantization.gguf_blocks import gguf_to_fusecc, is_decoder_linear
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        processor = TENSOR_PROCESSORS.get(self.metadata["general.architecture"], TensorProcessor)(
            config=self.parsed["config"])
        with _memoized_tensor_name_map():
            names = get_gguf_hf_weights_map(reference, processor)
        parsed = {**self.parsed, "tensors": {}}  # where MoE processors park expert slices
        for name, ggml_type, data in _tensor_data(self.path, self._table, self._data_start):
            if quant is not None and is_decoder_linear(name):  # qweight, scales(, zeros): [N, ...]
                parts = gguf_to_fusecc(data, ggml_type)
            else:
                parts = {"weight": dequantize(data, ggml_type)}
            for part, array in parts.items():
                # processors undo llama.cpp's layout (q/k rows interleaved per head) and rename
                result = processor.process(weights=array, name=name, tensor_key_mapping=names,
                                           parsed_parameters=parsed)
                if result.name not in names:  # others (rope_freqs) are derived by the model
                    continue
                value = torch.from_numpy(np.copy(result.weights))
                if part == "weight":
                    yield names[result.name], value.to(dtype)
                else:
                    yield names[result.name].removesuffix("weight") + part, value

    def load_tokenizer(self):
        """transformers' tokenizer for the file (vocabulary, merges, special tokens, chat template)."""
        from transformers import AutoTokenizer

        if self.parsed["config"]["model_type"] == "llama":
            tokenizer = self._llama_tokenizer()
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                      local_files_only=True)
        eos = self.metadata.get("tokenizer.ggml.eos_token_id")
        if isinstance(eos, int) and tokenizer.eos_token_id != eos:
            # transformers 5.17 gives SmolLM2's GGUF tokenizer eos <|im_start|> (id 1) while the
            # file says 2 (<|im_end|>); the file is right
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
        return tokenizer

    def _llama_tokenizer(self):
        """What AutoTokenizer.from_pretrained(folder, gguf_file=name) builds for a llama file (a
        TokenizersBackend over transformers' GGUF converter), from the metadata parsed once: AutoTokenizer
        parses the file twice more (13 s for SmolLM2's 49k tokens, against 0.2 s)."""
        from transformers.integrations.ggml import convert_gguf_tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        backend, extra = convert_gguf_tokenizer("llama", self.parsed["tokenizer"])
        kwargs = {**self.parsed["tokenizer_config"], **extra}
        # a GPT-2 style BPE: transformers ignores (and warns about) the space clean-up it would get
        kwargs["clean_up_tokenization_spaces"] = False
        return TokenizersBackend(tokenizer_object=backend, **kwargs)

    def eos_token_ids(self) -> set[int]:
        return {int(self.metadata[k]) for k in _EOS_KEYS if isinstance(self.metadata.get(k), int)}

    def generation_defaults(self) -> dict:
        """SamplingParams defaults from llama.cpp's general.sampling.* keys, when the file has them."""
        return {ours: self.metadata[key] for key, ours in _SAMPLING_KEYS.items() if key in self.metadata}


def _tensor_data(path: Path, table: list[tuple], data_start: int):
    """(name, GGML type, data) of each tensor of `table` (_read_header's), as gguf's GGUFReader
    presents them (floats as typed arrays in torch order, block types as uint8 rows of their bytes),
    from the memory-mapped file: GGUFReader would first parse every metadata string into numpy
    views (6 s for SmolLM2's 49k-token vocabulary), which load_gguf_checkpoint did already."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T
    from transformers.integrations.gguf.reader import _mapped

    blob = _mapped(str(path))
    typed = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
             T.I32: np.int32, T.I64: np.int64}
    for name, shape, ggml_type, offset in table:  # shape in torch order
        block_elements, block_bytes = GGML_QUANT_SIZES[T(ggml_type)]
        nbytes = math.prod(shape) // block_elements * block_bytes
        raw = blob[data_start + offset:data_start + offset + nbytes]
        if ggml_type in typed:
            data = raw.view(typed[ggml_type]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], -1)  # [rows..., bytes of a row]
        yield name, ggml_type, data


@contextlib.contextmanager
def _memoized_tensor_name_map():
    """transformers' get_gguf_hf_weights_map recurses over every module and rebuilds gguf's name
    table (get_tensor_name_map: thousands of format calls) at each of them: 397 times, 9 s, for
    SmolLM2. The table depends only on (architecture, layers), so it is built once while mapping."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _read_header(path: Path) -> tuple[dict, list[tuple], int]:
    """(metadata with the long string arrays left as counts, the tensor table [(name, shape in torch
    order, GGML type, offset)], where the tensor data starts) in a fraction of a second.
    transformers' GgufHeader would do, but it refuses the types its own kernels lack (Q4_1 among
    them), which gguf.dequantize reads; so its table reader, private, is used directly."""
    from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table

    blob = _mapped(str(path))
    metadata, count, pos = _read_metadata(blob, str(path))
    entries, pos = _read_tensor_table(blob, count, pos)
    alignment = metadata.get("general.alignment", 32)  # llama.cpp's default
    return metadata, entries, (pos + alignment - 1) // alignment * alignment


def _float_dtype(types: dict[str, int]) -> torch.dtype | None:
    """The float type of a file of unquantized half floats (its norms stay F32); None otherwise."""
    from gguf import GGMLQuantizationType as T

    kinds = set(types.values())
    if not kinds <= {T.F32, T.F16, T.BF16}:
        return None
    return torch.bfloat16 if T.BF16 in kinds else torch.float16 if T.F16 in kinds else None


def _check_tensor_types(path: Path, types: dict[str, int]) -> None:
    """ValueError naming the first tensor whose GGML type the gguf package cannot dequantize."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    # gguf.dequantize reads F32, F16 and every type with a _type_traits entry (its own dispatch)
    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    for name, code in types.items():
        kind = GGMLQuantizationType(code) if code in GGMLQuantizationType._value2member_map_ else None
        if kind not in readable:
            what = kind.name if kind is not None else f"number {code} (unknown)"
            raise ValueError(f"{path.name}: tensor {name!r} has GGML type {what}, which fusecc cannot "
                             f"dequantize; supported: {', '.join(sorted(t.name for t in readable))}")
