"""`modelpool serve`: start the server from a TOML file or from flags."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from service import config as config_module


def _devices(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--devices wants GPU indices like 0,1: {text!r}") from exc


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="modelpool serve", description="Serve models over gRPC.")
    parser.add_argument("--config", help="TOML configuration file (other flags then only override [server])")
    parser.add_argument("--model", default="builtin", help="builtin, a local folder, hf:<repo> or modelscope:<id>")
    parser.add_argument("--name", help="the model's name in requests (default: derived from --model)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes for the model")
    parser.add_argument("--devices", type=_devices, default=[], help="GPUs to split among the workers, e.g. 0,1")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--device-map", default="auto", help="auto, balanced, balanced_low_0 or sequential")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: split the cores)")
    parser.add_argument(
        "--cpu-linear",
        choices=("onednn", "aten"),
        default="onednn",
        help="matrix products of a float32 model on the CPU: oneDNN on weights packed at load, or torch's own",
    )
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument(
        "--max-step-tokens", type=int, default=None, help="tokens per engine step (prompt chunks); 0 = unchunked"
    )
    parser.add_argument("--prefix-cache-mib", type=int, default=None, help="prompt prefix cache per worker; 0 = off")
    parser.add_argument(
        "--max-overtakes", type=int, default=None, help="a request overtaken this many times by priority goes first"
    )
    parser.add_argument("--max-queue", type=int, default=None)
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=None,
        help="tokens per StreamGenerate message after the first (default 1): fewer messages, less CPU per token",
    )
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="gRPC port (default 50051)")
    parser.add_argument("--metrics-host", default=None, help="address of /metrics (default 127.0.0.1)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default 8002, 0 = off)")
    parser.add_argument("--drain-timeout", type=float, default=None, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve gRPC over TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates (mutual TLS)")
    parser.add_argument("--metrics-tls", action="store_true", default=None, help="serve /metrics over TLS too")
    parser.add_argument(
        "--auth-tokens-file", default=None, help="TOML file of bearer tokens (format in service/auth.py)"
    )
    parser.add_argument(
        "--no-reflection", dest="reflection", action="store_false", default=None, help="turn server reflection off"
    )
    parser.add_argument("--log-level", default=os.environ.get("MODELPOOL_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("MODELPOOL_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per line for log shippers (env MODELPOOL_LOG_FORMAT)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> config_module.ServerConfig:
    server = {
        key: value
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("metrics_host", args.metrics_host),
            ("metrics_port", args.metrics_port),
            ("drain_timeout_s", args.drain_timeout),
        )
        if value is not None
    }
    if args.config:
        cfg = config_module.load(args.config)
        for key, value in server.items():
            setattr(cfg, key, value)
        _apply_security_flags(cfg, args)
        return cfg.validate()
    cfg = config_module.from_flags(
        args.model,
        workers=args.workers,
        devices=args.devices,
        dtype=args.dtype,
        device_map=args.device_map,
        threads=args.threads,
        name=args.name,
        cpu_linear=args.cpu_linear,
        **server,
    )
    model = cfg.models[0]
    for key in (
        "max_batch_size",
        "max_batch_tokens",
        "max_step_tokens",
        "prefix_cache_mib",
        "max_overtakes",
        "max_queue",
        "stream_interval",
    ):
        if getattr(args, key) is not None:
            setattr(model, key, getattr(args, key))
    _apply_security_flags(cfg, args)
    return cfg.validate()


def _apply_security_flags(cfg: config_module.ServerConfig, args: argparse.Namespace) -> None:
    """TLS, token and reflection flags override the file. Tokens themselves never come from a flag."""
    for flag, key in (
        ("tls_cert", "cert"),
        ("tls_key", "key"),
        ("tls_client_ca", "client_ca"),
        ("metrics_tls", "metrics"),
    ):
        if getattr(args, flag) is not None:
            setattr(cfg.tls, key, getattr(args, flag))
    if args.auth_tokens_file is not None:
        cfg.auth.tokens_file = args.auth_tokens_file
    if args.reflection is not None:
        cfg.reflection = args.reflection


def _run_loop(main) -> None:
    """uvloop where installed: it cuts the frontend's CPU per streamed message by about a fifth."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def run(args: argparse.Namespace) -> int:
    from service import logs

    logs.configure(args.log_level, args.log_format)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = config_from_args(args)
    except config_module.ConfigError as exc:
        print(f"modelpool serve: configuration error: {exc}", file=sys.stderr)
        return 2
    from service.model_source import ModelSourceError
    from service.server import serve

    try:
        _run_loop(serve(cfg))
    except config_module.ConfigError as exc:
        print(f"modelpool serve: configuration error: {exc}", file=sys.stderr)
        return 2
    except ModelSourceError as exc:
        print(f"modelpool serve: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
