"""The `modelpool` command: generate, chat and models against a server, plus the commands other packages add.

Commands of other packages come from the entry-point group `modelpool.commands` (name -> a `main(argv) -> int`);
the server package adds `serve` there, so this client package imports nothing of the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from modelpool.channel import TLS
from modelpool.client import Client
from modelpool.errors import ModelpoolError
from modelpool.request import Message
from modelpool.v1 import generation_pb2 as pb

_DEFAULT_TARGET = os.environ.get("MODELPOOL_TARGET", "127.0.0.1:50051")
COMMAND_GROUP = "modelpool.commands"


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=_DEFAULT_TARGET, help="server address (env MODELPOOL_TARGET)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--tls", action="store_true", help="use TLS (implied by --ca, --cert, --key)")
    parser.add_argument("--ca", default=None, help="PEM file of the certificate authority to trust")
    parser.add_argument("--cert", default=None, help="PEM client certificate (mutual TLS, with --key)")
    parser.add_argument("--key", default=None, help="PEM private key of --cert")
    parser.add_argument("--server-name", default=None, help="name to check in the server's certificate")
    parser.add_argument("--token", default=os.environ.get("MODELPOOL_TOKEN"), help="bearer token (env MODELPOOL_TOKEN)")


def _client(args: argparse.Namespace) -> Client:
    tls: TLS | bool = args.tls
    if args.ca or args.cert or args.key or args.server_name:
        tls = TLS.from_files(args.ca, args.cert, args.key, args.server_name)
    return Client(args.target, tls=tls, token=args.token)


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    _add_connection_options(parser)
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    parser.add_argument("--priority", type=int, default=None, help="-100 to 100: higher is scheduled first")
    parser.add_argument(
        "--usage", action="store_true", help="print token counts and timings to stderr after each reply"
    )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop_sequences": args.stop,
        "priority": args.priority,
    }


def _stream_to_terminal(
    client: Client, args: argparse.Namespace, prompt: str | None = None, messages: list[Message] | None = None
) -> str:
    text = []
    last = None
    stream = client.stream(prompt, messages=messages, model=args.model, timeout=args.timeout, **_options(args))
    for piece in stream:
        sys.stdout.write(piece.text_delta)
        sys.stdout.flush()
        text.append(piece.text_delta)
        last = piece
    sys.stdout.write("\n")
    if args.usage and last is not None:
        finish = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        print(
            f"[prompt_tokens={last.usage.prompt_tokens} completion_tokens={last.usage.completion_tokens} "
            f"finish={finish} time_to_first_token={last.timings.time_to_first_token_seconds:.3f}s "
            f"total={last.timings.total_seconds:.3f}s]",
            file=sys.stderr,
        )
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.raw:
            _stream_to_terminal(client, args, prompt=args.prompt)
        else:
            messages: list[Message] = [("system", args.system)] if args.system else []
            _stream_to_terminal(client, args, messages=[*messages, ("user", args.prompt)])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    history: list[Message] = [("system", args.system)] if args.system else []
    print("Chatting with the model; /reset forgets the conversation, /quit or Ctrl-D ends.", file=sys.stderr)
    with _client(args) as client:
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            if line.strip() == "/quit":
                return 0
            if line.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append(("user", line))
            try:
                reply = _stream_to_terminal(client, args, messages=history)
            except KeyboardInterrupt:
                print("\n(interrupted)", file=sys.stderr)
                history.pop()
                continue
            history.append(("assistant", reply))


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models(include_placement=args.placement, timeout=args.timeout)
    for m in models:
        default = " (default)" if m.is_default else ""
        print(
            f"{m.name}{default}: source={m.source} dtype={m.dtype or '?'} context={m.context_length} "
            f"chat_template={'yes' if m.has_chat_template else 'no'}"
        )
        for w in m.workers:
            devices = ",".join(w.devices) or "-"
            print(
                f"  worker {w.index}: {pb.WorkerState.Name(w.state).removeprefix('WORKER_STATE_').lower()} "
                f"pid={w.pid} CUDA_VISIBLE_DEVICES={w.cuda_visible_devices or '(none)'} devices={devices} "
                f"running={w.running_sequences} outstanding={w.outstanding_requests} restarts={w.restarts}"
                + (f" last_error={w.last_error!r}" if w.last_error else "")
            )
            if w.HasField("placement"):
                _print_placement(w.placement)
    return 0


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _module_rows(groups: list[pb.ModuleGroup]) -> list[tuple[str, str, int]]:
    """(module, device, bytes) per line: consecutive numbered siblings on one device (model.layers.0 ...
    model.layers.39 on cuda:0) become one line, model.layers.0-39, so that a deep model's map stays readable."""
    rows: list[tuple[str, str, int]] = []
    run: tuple[str, int, int] | None = None  # (prefix, first, last) when the last row is numbered siblings
    for g in groups:
        prefix, _, number = g.module.rpartition(".")
        numbered = bool(prefix) and number.isdigit()
        if numbered and run and run[0] == prefix and run[2] + 1 == int(number) and rows[-1][1] == g.device:
            run = (prefix, run[1], int(number))
            rows[-1] = (f"{prefix}.{run[1]}-{run[2]}", g.device, rows[-1][2] + g.size_bytes)
        else:
            run = (prefix, int(number), int(number)) if numbered else None
            rows.append((g.module or "(whole model)", g.device, g.size_bytes))
    return rows


def _print_placement(placement: pb.Placement) -> None:
    folder = f" offload_folder={placement.offload_folder}" if placement.offload_folder else ""
    print(f"    placement: dtype={placement.dtype}{folder}")
    rows = _module_rows(list(placement.module_groups))
    width = max([len("module")] + [len(name) for name, _, _ in rows])
    print(f"      {'module':<{width}}  {'device':<8}  {'size':>10}")
    for name, device, size in rows:
        print(f"      {name:<{width}}  {device:<8}  {_size(size):>10}")
    print(f"      {'memory':<8}  {'allocated':>10}  {'reserved':>10}  {'total':>10}")
    for d in placement.device_memory:
        print(
            f"      {d.device:<8}  {_size(d.allocated_bytes):>10}  {_size(d.reserved_bytes):>10}  "
            f"{_size(d.total_bytes):>10}"
        )


def plugin_commands() -> dict[str, EntryPoint]:
    """Commands that installed packages add (the server adds `serve`)."""
    return {entry.name: entry for entry in entry_points(group=COMMAND_GROUP)}


def build_parser(plugins: dict[str, EntryPoint]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpool", description="modelpool gRPC model server and client")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, entry in sorted(plugins.items()):
        dist = entry.dist.name if entry.dist else entry.value
        sub.add_parser(name, help=f"added by {dist} (`modelpool {name} --help`)", add_help=False)
    if "serve" not in plugins:
        sub.add_parser("serve", help="run the server (needs the modelpool-server package)", add_help=False)

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--system", default=None, help="a system message")
    _add_generation_options(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive streaming chat that keeps the history")
    chat.add_argument("--system", default=None, help="a system message")
    _add_generation_options(chat)
    chat.set_defaults(func=cmd_chat)

    models = sub.add_parser("models", help="list the served models and their workers")
    models.add_argument(
        "--placement",
        action="store_true",
        help="also show where each worker put its model: module groups and their devices, memory per device",
    )
    _add_connection_options(models)
    models.set_defaults(func=cmd_models, timeout=10)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plugins = plugin_commands()
    if argv[:1] and argv[0] in plugins:
        command: Callable[[list[str]], int] = plugins[argv[0]].load()
        return command(argv[1:])
    if argv[:1] == ["serve"]:
        print("modelpool serve needs the server: pip install modelpool-server", file=sys.stderr)
        return 2
    args = build_parser(plugins).parse_args(argv)
    try:
        code: int = args.func(args)
    except ModelpoolError as exc:
        print(f"\nmodelpool: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
