"""The `fusecc` command: `fusecc demo`, `fusecc dump DIR`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusecc", description="fusecc compiler and runtime tools")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile a built-in tiny Llama and check it against eager")
    demo.add_argument("--dump-dir", default=None, help="where to write pass dumps (default: a temp folder)")

    dump = sub.add_parser("dump", help="summarise a FUSECC_DUMP_DIR folder")
    dump.add_argument("dir", help="the dump folder (FUSECC_DUMP_DIR)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from fusecc.demo import run_demo

        return run_demo(args.dump_dir)
    if args.command == "dump":
        from fusecc.debug.dump import summarize_dump_dir

        print(summarize_dump_dir(args.dir))
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
