"""`fusecc-serve` (also `fusecc serve`): an OpenAI-compatible server on one engine.

    fusecc-serve                                  # embedded default model on 127.0.0.1:8000
    fusecc-serve --model DIR --port 8080 --api-key KEY --max-num-seqs 64 --enforce-eager

Binds loopback unless --host says otherwise. SIGINT/SIGTERM: uvicorn stops accepting, lets
in-flight requests finish for --shutdown-timeout seconds, then cancels them (which aborts them
in the engine), and the engine is shut down last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
import threading

# Engine keyword arguments and their CLI types; only those given are passed on, so the engine's
# own defaults hold otherwise.
_ENGINE_ARGS = {
    "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int, "max_waiting": int,
    "gpu_memory_utilization": float, "num_kv_blocks": int, "block_size": int, "dtype": str, "seed": int,
    "device": str, "tokenizer": str,
}

logger = logging.getLogger("fusecc.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusecc-serve", description="OpenAI-compatible server for fusecc")
    p.add_argument("--model", default=None, help="model folder (HF layout); default: the embedded model")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=_bounded(int, 0, 65535), default=8000)
    p.add_argument("--api-key", type=_non_empty, default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model`")
    p.add_argument("--max-queue", type=_bounded(int, 1), default=None,
                   help="requests in flight in the server before it answers 429 (default 4096)")
    p.add_argument("--max-body-bytes", type=_bounded(int, 1), default=None, help="request body limit (default 4 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info")
    g = p.add_argument_group("engine")
    for name, typ in _ENGINE_ARGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    g.add_argument("--enforce-eager", action="store_true", default=None,
                   help="no torch.compile / CUDA graphs (fastest start, slowest decode)")
    # Test hook: build the engine with `module:callable(model, **engine_args)` instead of
    # AsyncLLMEngine.from_engine_args (tests run the real server on a fake engine).
    p.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)
    return p


def _bounded(kind, low, high=None):
    """An argparse type: a `kind` number in [low, high], else a usage error naming the value."""
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


def _engine_factory(spec: str | None):
    if spec is None:
        from fusecc.runtime.async_engine import AsyncLLMEngine

        return AsyncLLMEngine.from_engine_args
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn.Server that does not re-raise SIGINT/SIGTERM after its graceful shutdown (uvicorn
        does, to die of the signal): the engine still has to shut down, and then we exit 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


async def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fusecc.serve.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, create_app

    engine_args = {k: getattr(args, k) for k in (*_ENGINE_ARGS, "enforce_eager") if getattr(args, k) is not None}
    try:
        engine = _engine_factory(args.engine_factory)(args.model, **engine_args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError) as exc:
        # a bad --model/--dtype/--device/size: one line, as argparse reports its own errors
        print(f"fusecc-serve: error: cannot start the engine: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(engine, args.served_model_name, api_key=args.api_key,
                         max_queue=args.max_queue or DEFAULT_MAX_QUEUE,
                         max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                                timeout_graceful_shutdown=args.shutdown_timeout, lifespan="off")
        server = _server_class()(config)
        logger.info("serving %s (max_model_len=%d) on http://%s:%d", args.served_model_name or engine.model_name,
                    engine.max_model_len, args.host, args.port)
        await server.serve()  # installs SIGINT/SIGTERM handlers; returns after graceful shutdown
    finally:
        await engine.shutdown()
        logger.info("engine shut down")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
