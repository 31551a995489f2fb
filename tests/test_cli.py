"""The `fusecc` command's user mistakes: one line on stderr, exit code 2, no traceback.
Each runs the command as a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fusecc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusecc.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    # argparse puts a usage line above its errors; fusecc's own errors are the only line
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("usage:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"fusecc {command}: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("how", ["positional", "--model"])
def test_generate_missing_model(tmp_path, how):
    missing = str(tmp_path / "no-such-model")
    args = [missing] if how == "positional" else ["--model", missing]
    line = error_line(fusecc("generate", *args, "--prompt", "hi"), "generate")
    assert missing in line and "is not a local directory" in line


def test_generate_folder_that_is_not_a_checkpoint(tmp_path):
    line = error_line(fusecc("generate", str(tmp_path), "--prompt", "hi"), "generate")
    assert line == f"fusecc generate: error: {tmp_path} has no config.json: not a Hugging Face model folder"


@pytest.mark.parametrize("args, message", [
    (("--max-tokens", "0"), "argument --max-tokens: must be an integer >= 1, got 0"),
    (("--temperature", "-1"), "argument --temperature: must be a finite number >= 0 (0 = greedy), got -1.0"),
    (("--temperature", "nan"), "argument --temperature: must be a finite number >= 0 (0 = greedy), got nan"),
    (("a", "--model", "b"), "two models given: a and --model b"),
])
def test_generate_bad_options(args, message):
    # checked before any model is loaded: a missing model folder is not what gets reported
    assert error_line(fusecc("generate", "--prompt", "hi", *args), "generate") == f"fusecc generate: error: {message}"


def test_generate_prompt_too_long():
    line = error_line(fusecc("generate", "--enforce-eager", "--prompt", "x" * 3000), "generate")
    assert "leaves no room to generate within max_model_len" in line


def test_generate_runs():
    proc = fusecc("generate", "--enforce-eager", "--prompt", "hi", "--prompt", "yo", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("'hi' -> ") and lines[1].startswith("'yo' -> ")
    assert all(line.endswith("(3 tokens, length)") for line in lines)


def test_dump_missing_folder(tmp_path):
    line = error_line(fusecc("dump", str(tmp_path / "none")), "dump")
    assert str(tmp_path / "none") in line and "is not a folder" in line


def test_demo_dump_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    line = error_line(fusecc("demo", "--dump-dir", str(path)), "demo")
    assert line == f"fusecc demo: error: cannot use --dump-dir {path}: a file is in the way"

