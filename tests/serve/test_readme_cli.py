"""The README's fusecc-serve section lists exactly the options `fusecc-serve --help` has, each with
the default the parser holds (so a new flag, or a changed default, must be documented)."""

import argparse
import re
from pathlib import Path

from fusecc.serve.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_serve_section() -> str:
    text = README.read_text()
    start = text.index("### fusecc-serve")
    return text[start:text.index("\n## ", start)]


def readme_options() -> set[str]:
    rows = [line for line in readme_serve_section().splitlines() if line.startswith("| `")]
    return {flag for row in rows for flag in re.findall(r"`(--[a-z0-9-]+)`", row.split("|")[1])}


def parser_options() -> set[str]:
    flags = set()
    for action in build_parser()._actions:
        if action.help == argparse.SUPPRESS:  # test hooks (--engine-factory)
            continue
        flags.update(s for s in action.option_strings if s.startswith("--") and s != "--help")
    return flags


def test_every_option_is_in_the_readme_and_every_readme_option_exists():
    documented, actual = readme_options(), parser_options()
    assert actual - documented == set(), "options missing from the README's fusecc-serve tables"
    assert documented - actual == set(), "the README lists options fusecc-serve does not have"


def test_the_readme_gives_the_parsers_defaults():
    # the argparse defaults are None (only given flags pass on); the defaults users see are in --help
    help_text = " ".join(build_parser().format_help().split())
    section = readme_serve_section()
    for flag, default in (("--port", "8000"), ("--max-queue", "4096"), ("--request-read-timeout", "30"),
                          ("--shutdown-timeout", "10"), ("--max-num-seqs", "256"), ("--block-size", "16"),
                          ("--max-num-batched-tokens", "8192"), ("--gpu-memory-utilization", "0.9")):
        row = next(line for line in section.splitlines() if line.startswith("| ") and f"`{flag}`" in line.split("|")[1])
        assert default in row.split("|")[2], (flag, row)
        assert re.search(re.escape(flag) + r"\b.*?\(default: " + re.escape(default), help_text), flag
