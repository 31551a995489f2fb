"""The real `fusecc-serve` process: a vLLM-style command line on a tiny Llama checkpoint, --help,
--version, the key from the environment, and start-up failures that must come before the engine."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve.conftest import REPO, ServerProcess

SERVE = str(Path(sys.executable).with_name("fusecc-serve"))
# The tiny checkpoint's tokenizer is a word-level one over "w3".."w127": the template only joins words.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w3 {% endif %}")


def _env(**extra) -> dict:
    # the console script imports fusecc from PYTHONPATH: this worktree's, not the installed one
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _launch(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([SERVE, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env or _env())
    return proc, log


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """The port from the 'ready in X s ... on http://host:PORT' line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"ready in [\d.]+ s: .* on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server not ready after {timeout}s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from tests.runtime.hf_checkpoints import save_tiny_checkpoint, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_checkpoint("llama", path)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    generation = path / "generation_config.json"  # sampling defaults, as instruct checkpoints ship them
    config = json.loads(generation.read_text()) if generation.exists() else {}
    generation.write_text(json.dumps({**config, "max_new_tokens": 5, "temperature": 0.0, "top_k": 7}))
    return path


@pytest.fixture(scope="module")
def vllm_style_server(llama_dir, tmp_path_factory):
    # compiled (no --enforce-eager): the engine warms up before /health answers
    # one intra-op thread: under pytest -n 2 the other worker holds the second core, and two OpenMP
    # threads fighting it make step times swing by 5x, which the first-request check would misread
    proc, log = _launch(tmp_path_factory.mktemp("vllm-style"), str(llama_dir), "--dtype", "auto", "--max-model-len",
                        "2k", "--served-model-name", "m", "--api-key", "k", "--port", "0",
                        env=_env(OMP_NUM_THREADS="1"))
    server = ServerProcess(proc, _wait_ready(proc, log, timeout=240), log)
    yield server
    server.stop()


def test_vllm_style_command_line_serves_the_openai_client(vllm_style_server):
    server = vllm_style_server
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", timeout=120, max_retries=0) as client:
        kw = dict(model="m", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        client.models.list()  # the client's own first-call costs (connection, lazy imports) are not the server's
        # timed without the SDK's parsing: its first parse of a Completion builds pydantic validators
        # (~50 ms here), a cost of the client's first call, not of the server's first request
        create = client.completions.with_raw_response.create
        first = time.perf_counter()
        raw = create(prompt="w5 w6 w7", **kw)
        first = time.perf_counter() - first
        r = raw.parse()
        assert r.model == "m" and r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 3
        times = []
        for i in range(10):
            t = time.perf_counter()
            create(prompt=f"w{8 + i} w9", **kw)
            times.append(time.perf_counter() - t)
        # nothing compiles or initializes on the first request: the engine warmed up at start. A graph
        # compiled at the first request costs seconds here; 0.1 s absorbs what a loaded 2-core CI machine
        # adds to one 15 ms request now and then (CI saw 48 ms against a 15 ms median once)
        assert first <= 3 * statistics.median(times) + 0.1, (first, times)
        chat = client.chat.completions.create(messages=[{"role": "user", "content": "w10 w11"}], **kw)
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 8
        assert chat.usage.prompt_tokens == 4  # <s> w10 w11 w3: the checkpoint's own template
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=server.url + "/v1", api_key="k").models.list().data] == ["m"]
    # max_model_len 2k = 2000, lowered to the checkpoint's 256 positions
    assert "max_model_len=256" in server.log()


def test_generation_config_defaults_apply_to_fields_left_unset(vllm_style_server):
    server = vllm_style_server
    assert "from generation_config.json (--generation-config vllm ignores it): max_tokens=5, temperature=0.0, " \
           "top_k=7" in server.log()
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", timeout=60, max_retries=0) as client:
        kw = dict(model="m", prompt="w5 w6", extra_body={"ignore_eos": True})
        assert client.completions.create(**kw).usage.completion_tokens == 5  # not OpenAI's 16
        assert client.completions.create(**kw, max_tokens=9).usage.completion_tokens == 9
        # temperature 0 by default: greedy, so two samples agree
        texts = {client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2)}
        assert len(texts) == 1


def test_help_describes_every_option_with_its_default():
    from fusecc.serve.cli import build_parser

    actions = [a for a in build_parser()._actions if a.help != argparse.SUPPRESS]
    assert len(actions) > 30
    for a in actions:
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert a.help and "(default: " in a.help, a.option_strings or a.dest
    out = subprocess.run([SERVE, "--help"], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0
    for flag in ("MODEL", "--dtype", "--max-model-len", "--enable-prefix-caching", "--no-enable-chunked-prefill",
                 "--enforce-eager", "--tensor-parallel-size", "--quantization", "--kv-cache-dtype",
                 "--speculative-config", "--chat-template", "--generation-config", "--api-key", "--version"):
        assert flag in out.stdout, flag
    version = subprocess.run([SERVE, "--version"], capture_output=True, text=True, env=_env(), timeout=60)
    assert version.returncode == 0 and re.fullmatch(r"fusecc-serve \S+.*\n", version.stdout), version.stdout


def test_api_key_flag_wins_over_the_environment(monkeypatch):
    from fusecc.serve.cli import parse_args

    monkeypatch.setenv("FUSECC_API_KEY", "from-env")
    assert parse_args([])[0].api_key == "from-env"
    assert parse_args(["--api-key", "from-flag"])[0].api_key == "from-flag"
    monkeypatch.setenv("FUSECC_API_KEY", "")
    with pytest.raises(SystemExit):  # an unset $VAR expanded to "": never serve without the key by mistake
        parse_args([])


def test_a_taken_port_fails_at_once_before_the_engine(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        # the real engine (a model load) would come next; the error must come first
        proc = subprocess.run([SERVE, "--port", str(port), "--enforce-eager"], capture_output=True, text=True,
                              env=_env(), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"fusecc-serve: error: cannot bind 127.0.0.1:{port}: Address already in use"], proc.stderr
    assert "ready" not in proc.stdout and time.monotonic() - start < 15


def test_port_zero_logs_the_port_bound(tmp_path):
    proc, log = _launch(tmp_path, "--port", "0", "--engine-factory", "tests.serve.fake_engine:make_engine")
    try:
        port = _wait_ready(proc, log, timeout=30)
        assert port != 0 and httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
