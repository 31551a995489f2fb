"""Run tests/compile_cache/child.py in a fresh process with a given cache folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_child(cache_dir: Path, how: str, options: dict | None = None, **env_overrides) -> tuple[dict, str]:
    """(the child's report, its stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSECC_")}
    env.update(FUSECC_CACHE_DIR=str(cache_dir), FUSECC_DEFAULT_MODEL="tiny", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", **env_overrides)
    result = subprocess.run([sys.executable, "-m", "tests.compile_cache.child", how, json.dumps(options or {})],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):]), result.stderr
