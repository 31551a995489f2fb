"""Backend options: options=, FUSECC_* environment variables, precedence, modes, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fusecc.config import FuseccOptions


def opts(mode=None, options=None, **env):
    return FuseccOptions.from_sources(mode=mode, options=options, environ=env)


def test_defaults_match_readme():
    o = opts()
    assert (o.freeze, o.dump_dir, o.strict, o.verify, o.cudagraphs, o.autotune) == (False, "", False, True, False, False)
    assert o.constant_fold_max_bytes == 64 * 1024 * 1024
    assert o.max_pass_rounds == 4
    assert o.disable_passes == ()
    assert o.mode == "default"


def test_from_options():
    o = opts(options={"freeze": True, "dump_dir": "/tmp/x", "max_pass_rounds": 2,
                      "constant_fold_max_bytes": 0, "disable_passes": ["cse", "dce"], "strict": True,
                      "verify": False})
    assert o.freeze is True and o.strict is True and o.verify is False
    assert o.dump_dir == "/tmp/x"
    assert o.max_pass_rounds == 2 and o.constant_fold_max_bytes == 0
    assert o.disable_passes == ("cse", "dce")


def test_path_accepted_for_dump_dir(tmp_path):
    assert opts(options={"dump_dir": tmp_path}).dump_dir == str(tmp_path)


@pytest.mark.parametrize("text,value", [("1", True), ("true", True), ("YES", True), ("on", True),
                                        ("0", False), ("false", False), ("off", False), ("", False)])
def test_env_bool(text, value):
    assert opts(FUSECC_FREEZE=text).freeze is value


def test_from_env():
    o = opts(FUSECC_DUMP_DIR="/tmp/d", FUSECC_MAX_PASS_ROUNDS="7", FUSECC_DISABLE_PASSES="cse, dce",
             FUSECC_STRICT="1", FUSECC_CONSTANT_FOLD_MAX_BYTES="1024")
    assert o.dump_dir == "/tmp/d"
    assert o.max_pass_rounds == 7
    assert o.disable_passes == ("cse", "dce")
    assert o.strict is True
    assert o.constant_fold_max_bytes == 1024


def test_every_field_has_an_env_var():
    for f in dataclasses.fields(FuseccOptions):
        if f.name == "extra":
            continue
        # A value that is invalid for every type (not bool, int, or mode): must be rejected or
        # taken as text, never silently ignored.
        env = {"FUSECC_" + f.name.upper(): "not-a-value"}
        try:
            o = FuseccOptions.from_sources(environ=env)
        except (ValueError, TypeError) as exc:
            assert f"FUSECC_{f.name.upper()}" in str(exc) or f.name in str(exc)
        else:
            assert getattr(o, f.name) in ("not-a-value", ("not-a-value",)), f.name


def test_options_win_over_env():
    o = opts(options={"freeze": False, "max_pass_rounds": 3, "dump_dir": "/opt"},
             FUSECC_FREEZE="1", FUSECC_MAX_PASS_ROUNDS="9", FUSECC_DUMP_DIR="/env", FUSECC_STRICT="1")
    assert o.freeze is False
    assert o.max_pass_rounds == 3
    assert o.dump_dir == "/opt"
    assert o.strict is True  # not given in options: the environment still applies


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("FUSECC_MAX_PASS_ROUNDS", "5")
    assert FuseccOptions.from_sources().max_pass_rounds == 5
    monkeypatch.delenv("FUSECC_MAX_PASS_ROUNDS")
    assert FuseccOptions.from_sources().max_pass_rounds == 4


@pytest.mark.parametrize("mode,cudagraphs,autotune", [
    ("default", False, False), ("reduce-overhead", True, False),
    ("max-autotune", True, True), ("max-autotune-no-cudagraphs", False, True),
])
def test_modes(mode, cudagraphs, autotune):
    for o in (opts(mode=mode), opts(options={"mode": mode}), opts(FUSECC_MODE=mode)):
        assert (o.mode, o.cudagraphs, o.autotune) == (mode, cudagraphs, autotune)


def test_mode_beats_env_flag_but_not_explicit_option():
    assert opts(mode="reduce-overhead", FUSECC_CUDAGRAPHS="0").cudagraphs is True
    assert opts(options={"mode": "reduce-overhead", "cudagraphs": False}).cudagraphs is False
    # torch.compile's mode= argument beats FUSECC_MODE
    assert opts(mode="reduce-overhead", FUSECC_MODE="max-autotune").autotune is False


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="unknown option 'frezee'"):
        opts(options={"frezee": True})


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        opts(mode="fastest")
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        opts(FUSECC_MODE="fastest")


@pytest.mark.parametrize("name,value", [
    ("freeze", 1), ("freeze", None), ("strict", "maybe"), ("max_pass_rounds", 2.5),
    ("max_pass_rounds", True), ("max_pass_rounds", "many"), ("constant_fold_max_bytes", "1 MiB"),
    ("dump_dir", 3), ("disable_passes", 5), ("disable_passes", [1, 2]), ("mode", 3),
])
def test_bad_types_name_the_option(name, value):
    with pytest.raises((TypeError, ValueError), match=name):
        opts(options={name: value})


@pytest.mark.parametrize("name,value", [("max_pass_rounds", 0), ("constant_fold_max_bytes", -1)])
def test_bad_values_name_the_option(name, value):
    with pytest.raises(ValueError, match=name):
        opts(options={name: value})


@pytest.mark.parametrize("env,name", [("FUSECC_FREEZE", "maybe"), ("FUSECC_MAX_PASS_ROUNDS", "x"),
                                      ("FUSECC_MAX_PASS_ROUNDS", "0")])
def test_bad_env_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match="FUSECC_MAX_PASS_ROUNDS|FUSECC_FREEZE|max_pass_rounds"):
        opts(**{env: name})


def test_options_not_a_dict():
    with pytest.raises(TypeError, match="options"):
        opts(options=[("freeze", True)])


# ---- through torch.compile: the backend reads the options it is given -------------------


@pytest.fixture(autouse=True)
def _plain_cpu_user(monkeypatch):
    # conftest sets TRITON_INTERPRET=1 for the kernel tests; a CPU user does not have it (with it,
    # the backend would run generated kernels through the slow Triton interpreter).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in [k for k in __import__("os").environ if k.startswith("FUSECC_")]:
        monkeypatch.delenv(name)


def _compile_and_call(**compile_kwargs):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.relu(x) + 1, backend="fusecc", **compile_kwargs)
    with torch.no_grad():
        return fn(torch.randn(4))


def test_unknown_option_through_torch_compile_names_it():
    with pytest.raises(Exception, match="unknown option 'no_such_option'"):
        _compile_and_call(options={"no_such_option": 1})


def test_bad_type_through_torch_compile_names_it():
    with pytest.raises(Exception, match="max_pass_rounds"):
        _compile_and_call(options={"max_pass_rounds": "lots"})


def test_env_dump_dir_through_torch_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECC_DUMP_DIR", str(tmp_path / "env"))
    _compile_and_call()
    assert list((tmp_path / "env").glob("graph_*/report.json"))
    # options= beats the environment
    _compile_and_call(options={"dump_dir": str(tmp_path / "opt")})
    assert list((tmp_path / "opt").glob("graph_*/report.json"))
    assert len(list((tmp_path / "env").glob("graph_*"))) == 1


def test_mode_through_torch_compile_reaches_backend(tmp_path, monkeypatch):
    # torch.compile refuses mode= together with options=, so the dump dir comes from the environment.
    monkeypatch.setenv("FUSECC_DUMP_DIR", str(tmp_path))
    out = _compile_and_call(mode="reduce-overhead")
    assert out.shape == (4,)
    import json

    (report,) = [json.loads(p.read_text()) for p in Path(tmp_path).glob("graph_*/report.json")]
    assert "cudagraphs=True" in report["options"]
    assert "mode='reduce-overhead'" in report["options"]


# ---- mistakes: alike, named, and one line first -------------------------------------------


@pytest.mark.parametrize("value", [1, 0, "1", "true", "banana", None, 1.0])
def test_a_bool_option_takes_only_a_bool_and_refuses_everything_else_alike(value):
    # only environment variables are text to parse; options= values have the option's type
    with pytest.raises(TypeError, match=r"options\['freeze'\] must be True or False, got .* \("):
        opts(options={"freeze": value})


def test_an_unknown_option_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown option 'freze' \(did you mean 'freeze'\?\)"):
        opts(options={"freze": True})


def test_a_misspelled_environment_variable_warns_with_the_closest():
    with pytest.warns(UserWarning, match=r"FUSECC_FREZE is not a fusecc option.*did you mean 'FUSECC_FREEZE'"):
        o = opts(FUSECC_FREZE="1")
    assert o.freeze is False


def test_known_non_option_variables_do_not_warn(recwarn):
    opts(FUSECC_CACHE_DIR="/tmp/k", FUSECC_API_KEY="k", FUSECC_FREEZE="1")
    assert not [w for w in recwarn if "FUSECC_" in str(w.message)]


def test_an_option_mistake_is_the_error_torch_compile_raises_not_a_wrapped_one():
    # Dynamo wraps a backend's exceptions in BackendCompilerFailed, whose first line is its own;
    # an option mistake must reach the user as itself, its one line first.
    from torch._dynamo.exc import BackendCompilerFailed

    with pytest.raises(ValueError) as info:
        _compile_and_call(options={"freze": True})
    assert not isinstance(info.value, BackendCompilerFailed)
    assert str(info.value).splitlines()[0].startswith("fusecc: unknown option 'freze' (did you mean 'freeze'?)")
    with pytest.raises(TypeError, match="must be True or False"):
        _compile_and_call(options={"freeze": 1})
