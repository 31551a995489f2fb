"""The `fusecc` command: `fusecc demo`, `fusecc dump DIR`, `fusecc serve ...`, `fusecc bench serve ...`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `serve` and `bench serve` own their options: hand everything after the subcommand over.
    if argv[:1] == ["serve"]:
        from fusecc.serve.cli import main as serve_main

        return serve_main(argv[1:])
    if argv[:2] == ["bench", "serve"]:
        from fusecc.serve.bench import main as bench_main

        return bench_main(argv[2:])

    parser = argparse.ArgumentParser(prog="fusecc", description="fusecc compiler and runtime tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="OpenAI-compatible server (same as fusecc-serve; see `fusecc serve --help`)")
    bench = sub.add_parser("bench", help="`fusecc bench serve --base-url URL`: serving load generator")
    bench.add_argument("what", choices=["serve"])

    demo = sub.add_parser("demo", help="compile a built-in tiny Llama and check it against eager")
    demo.add_argument("--dump-dir", default=None, help="where to write pass dumps (default: a temp folder)")

    dump = sub.add_parser("dump", help="summarise a FUSECC_DUMP_DIR folder")
    dump.add_argument("dir", help="the dump folder (FUSECC_DUMP_DIR)")

    gen = sub.add_parser("generate", help="generate text with the engine (default: the embedded tiny model)")
    gen.add_argument("--model", default=None, help="a local Hugging Face checkpoint folder")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--enforce-eager", action="store_true", help="skip torch.compile and CUDA graphs")

    args = parser.parse_args(argv)
    if args.command == "generate":
        from fusecc import LLM, SamplingParams

        llm = LLM(args.model, enforce_eager=args.enforce_eager)
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
        for out in llm.generate(args.prompt, params, use_tqdm=False):
            c = out.outputs[0]
            print(f"{out.prompt!r} -> {c.text!r}  ({len(c.token_ids)} tokens, {c.finish_reason})")
        return 0
    if args.command == "demo":
        from fusecc.demo import run_demo

        return run_demo(args.dump_dir)
    if args.command == "dump":
        import os

        from fusecc.debug.dump import summarize_dump_dir

        if not os.path.isdir(args.dir):
            print(f"fusecc dump: {args.dir} is not a folder", file=sys.stderr)
            return 1
        print(summarize_dump_dir(args.dir))
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
