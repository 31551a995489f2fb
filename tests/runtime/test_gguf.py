"""GGUF checkpoints (fusecc/runtime/gguf.py) on tiny files written here with the `gguf` package:
weights through transformers' GGUF conversion into our Llama, generation against transformers, and
the one-line errors. The real SmolLM2 file: test_gguf_smollm2.py."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package (pip install 'fusecc[demo]')")

from fusecc import LLM, SamplingParams  # noqa: E402
from fusecc.runtime.gguf import GGUFCheckpoint, gguf_file  # noqa: E402
from fusecc.runtime.loader import build_model  # noqa: E402
from fusecc.runtime.models.llama import LlamaForCausalLM  # noqa: E402
from tests.runtime.gguf_files import tiny_hf_llama, write_llama_gguf  # noqa: E402
from tests.runtime.hf_checkpoints import hf_greedy, prompts, single_thread, tiny_tokenizer  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("single_thread")
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_llama()


def native(hf_model) -> LlamaForCausalLM:
    return build_model(LlamaForCausalLM, hf_model.config, torch.float32, "cpu", None, hf_model.state_dict().items())


def test_gguf_weights_load_into_our_llama_exactly(tmp_path, hf_model):
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf_model)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.config.architectures == ["LlamaForCausalLM"] and ckpt.config.num_key_value_heads == 2
    assert ckpt.eos_token_ids() == {2}
    model = ckpt.load_model(torch.float32, "cpu")
    expected = native(hf_model).state_dict()
    # q/k come back un-permuted (llama.cpp interleaves their rows per head) and stacked into qkv_proj
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_quantized_tensors_are_dequantized_at_load(tmp_path, hf_model):
    quantize = {"blk.0.attn_q.weight": Q.Q8_0, "blk.0.ffn_up.weight": Q.Q4_1, "blk.1.ffn_down.weight": Q.Q4_0}
    path = write_llama_gguf(tmp_path / "q.gguf", hf_model, quantize=quantize)
    model = GGUFCheckpoint(path).load_model(torch.float32, "cpu")
    ours, expected = model.state_dict(), native(hf_model).state_dict()
    q = model.model.layers[0].self_attn.q_size
    up = ours["model.layers.0.mlp.gate_up_proj.weight"].shape[0] // 2
    pairs = [(ours["model.layers.0.self_attn.qkv_proj.weight"][:q], expected["model.layers.0.self_attn.qkv_proj.weight"][:q], 0.01),
             (ours["model.layers.0.mlp.gate_up_proj.weight"][up:], expected["model.layers.0.mlp.gate_up_proj.weight"][up:], 0.2),
             (ours["model.layers.1.mlp.down_proj.weight"], expected["model.layers.1.mlp.down_proj.weight"], 0.2)]
    for got, want, rel in pairs:
        assert not torch.equal(got, want)  # really quantized ...
        assert (got - want).abs().max() <= rel * want.abs().max()  # ... and dequantized back to the values


def test_llm_on_a_gguf_file_generates_what_transformers_generates(tmp_path, hf_model):
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf_model)
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    llm = LLM(str(path), tokenizer=str(tmp_path / "tok"), enforce_eager=True, dtype="float32", device="cpu",
              max_model_len=128)
    assert llm.engine.model_name == str(path)
    tok = llm.get_tokenizer()
    texts = prompts(3, seed=1, max_len=20)
    outs = llm.generate(texts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for text, out in zip(texts, outs):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert out.prompt_token_ids == ids
        want = hf_greedy(hf_model, ids, 8)
        if 2 in want:
            want = want[:want.index(2) + 1]
        assert out.outputs[0].token_ids[:len(want)] == want


def test_a_folder_with_one_gguf_is_that_file_and_two_are_an_error(tmp_path, hf_model):
    folder = tmp_path / "m"
    folder.mkdir()
    path = write_llama_gguf(folder / "a.gguf", hf_model)
    (folder / "README.md").write_text("not weights")
    assert gguf_file(folder) == path and gguf_file(path) == path
    assert gguf_file(tmp_path / "nothing-here") is None  # the folder loader reports a missing path
    (folder / "b.gguf").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\); name one") as err:
        LLM(str(folder))
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_gguf_is_a_one_line_error(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"is a file but not a GGUF file") as err:
        LLM(str(bogus))
    assert "\n" not in str(err.value)


def test_an_unsupported_architecture_is_named(tmp_path, hf_model):
    path = write_llama_gguf(tmp_path / "phi.gguf", hf_model, architecture="phi3")
    with pytest.raises(ValueError, match=r"phi\.gguf: GGUF architecture 'phi3' is not supported; supported: llama") \
            as err:
        LLM(str(path))
    assert "\n" not in str(err.value)


def test_an_unsupported_tensor_type_is_named(tmp_path, hf_model):
    path = write_llama_gguf(tmp_path / "t.gguf", hf_model)
    data = bytearray(path.read_bytes())
    # retype the first tensor (token_embd.weight, F32) as Q8_1 in the tensor table: the name, then
    # n_dims (u32), dims (u64 each), the type (u32)
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == Q.F32
    data[type_at:type_at + 4] = int(Q.Q8_1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor 'token_embd\.weight' has GGML type Q8_1, which fusecc cannot "
                                         r"dequantize; supported: .*Q4_1") as err:
        LLM(str(path))
    assert "\n" not in str(err.value)


def test_without_the_gguf_package_the_error_says_what_to_install(tmp_path, hf_model, monkeypatch):
    import importlib.util

    path = write_llama_gguf(tmp_path / "tiny.gguf", hf_model)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"loading tiny\.gguf needs the gguf package: pip install 'fusecc\[demo\]'"):
        GGUFCheckpoint(path)
