"""The naive reference server: one `model.generate` per request behind the modelpool proto, no batching.

Owns the benchmark's baseline: what a straightforward Hugging Face server looks
like. A synchronous gRPC server with a thread pool; each StreamGenerate runs
`model.generate(..., streamer=TextIteratorStreamer)` in a thread of its own, so
concurrent requests only share the CPU. Every generated token becomes one stream
message carrying its id and whatever text the streamer released with it (the
streamer holds back partial words, so some messages have ids and no text); the
last message carries the rest of the text, the finish reason and the usage.
Generate runs the same `model.generate` without a streamer.

It honours max_new_tokens (0 = 256), min_new_tokens, ignore_eos and the sampling
fields but `seed`; stop_sequences are refused. A cancelled call (client gone,
deadline) stops its `generate` at the next token. It also serves the standard
health service, SERVING once the model is loaded.

    python -m bench.naive_server --model builtin --port 50061
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
from concurrent import futures

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

_LOGGER = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
DEFAULT_MAX_NEW_TOKENS = 256
_ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
# How long a handler waits for the next token before it gives up on its generate thread.
_TOKEN_TIMEOUT_S = 600.0


class TokenTextStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer whose queue holds (text delta, new token ids, is last) per generated token.

    The text is exactly what TextIteratorStreamer would release; the ids let the
    client count tokens and time each of them. `end()` adds a last item with the
    held-back text and no ids.
    """

    def __init__(self, tokenizer, timeout: float | None = None):
        super().__init__(tokenizer, skip_prompt=True, timeout=timeout, skip_special_tokens=True)
        self._step_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        is_prompt = self.skip_prompt and self.next_tokens_are_prompt
        self._step_ids = [] if is_prompt else value.reshape(-1).tolist()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        ids, self._step_ids = self._step_ids, []
        self.text_queue.put((text, ids, stream_end), timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)


class StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the event is set (the call was cancelled)."""

    def __init__(self, event: threading.Event):
        self._event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str):
    context.abort(code, message)  # raises


class NaiveServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, model, tokenizer):
        self._model = model
        self._tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self._eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._eos_ids, default=0)

    # ------------------------------------------------------------ request -> generate arguments

    def _prompt_ids(self, request, context) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "prompt" and request.prompt:
            return list(self._tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
        if kind == "chat" and request.chat.messages:
            messages = []
            for message in request.chat.messages:
                if message.role not in _ROLES:
                    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "chat message without a role")
                messages.append({"role": _ROLES[message.role], "content": message.content})
            # Rendered as text, then tokenized without special tokens: the same ids modelpool's frontend makes.
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "set a non-empty prompt or chat")

    def _generate_kwargs(self, request, context) -> dict:
        stopping, sampling = request.stopping, request.sampling
        if stopping.stop_sequences:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the naive server does not support stop_sequences")
        max_new = stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        min_new = max_new if stopping.ignore_eos else stopping.min_new_tokens
        if min_new > max_new:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "min_new_tokens is more than max_new_tokens")
        kwargs = {
            "max_new_tokens": max_new,
            "min_new_tokens": min_new,
            "do_sample": sampling.do_sample,
            "pad_token_id": self._pad_id,
        }
        if sampling.repetition_penalty and sampling.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = sampling.repetition_penalty
        if sampling.do_sample:
            kwargs["temperature"] = sampling.temperature or 1.0
            kwargs["top_p"] = sampling.top_p or 1.0
            kwargs["top_k"] = sampling.top_k
        return kwargs

    def _inputs(self, prompt_ids: list[int]) -> dict:
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self._model.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def _finish_reason(self, generated: list[int], max_new_tokens: int) -> int:
        if generated and generated[-1] in self._eos_ids:
            return pb.FINISH_REASON_END_OF_SEQUENCE
        return pb.FINISH_REASON_LENGTH if len(generated) >= max_new_tokens else pb.FINISH_REASON_UNSPECIFIED

    # ------------------------------------------------------------ RPCs

    def Generate(self, request, context):
        prompt_ids = self._prompt_ids(request, context)
        kwargs = self._generate_kwargs(request, context)
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        output = self._model.generate(
            **self._inputs(prompt_ids), stopping_criteria=StoppingCriteriaList([StopWhenSet(cancelled)]), **kwargs
        )
        generated = output[0, len(prompt_ids) :].tolist()
        return pb.GenerateResponse(
            text=self._tokenizer.decode(generated, skip_special_tokens=True),
            finish_reason=self._finish_reason(generated, kwargs["max_new_tokens"]),
            usage=pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(generated)),
            token_ids=generated,
        )

    def StreamGenerate(self, request, context):
        prompt_ids = self._prompt_ids(request, context)
        kwargs = self._generate_kwargs(request, context)
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        streamer = TokenTextStreamer(self._tokenizer, timeout=_TOKEN_TIMEOUT_S)
        failure: list[BaseException] = []
        thread = threading.Thread(
            target=self._run_generate,
            args=(prompt_ids, kwargs, streamer, cancelled, failure),
            name="naive-generate",
            daemon=True,
        )
        thread.start()
        generated: list[int] = []
        text = ""
        try:
            for text, ids, last in streamer:
                generated.extend(ids)
                if last:
                    break
                yield pb.StreamGenerateResponse(text_delta=text, token_ids=ids)
        except queue.Empty:
            cancelled.set()
            _abort(context, grpc.StatusCode.INTERNAL, f"no token for {_TOKEN_TIMEOUT_S:.0f} s")
        thread.join()
        if failure:
            _abort(context, grpc.StatusCode.INTERNAL, f"generate failed: {failure[0]!r}")
        yield pb.StreamGenerateResponse(
            text_delta=text,
            finish_reason=self._finish_reason(generated, kwargs["max_new_tokens"]),
            usage=pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(generated)),
        )

    def _run_generate(self, prompt_ids, kwargs, streamer, cancelled, failure) -> None:
        try:
            self._model.generate(
                **self._inputs(prompt_ids),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([StopWhenSet(cancelled)]),
                **kwargs,
            )
        except Exception as exc:  # noqa: BLE001  (reported to the client by the handler)
            _LOGGER.exception("generate failed")
            failure.append(exc)
            streamer.end()  # unblocks the handler

    def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(name="naive", source=str(self._model.name_or_path), dtype="float32", is_default=True)]
        )


def load_model(model_path: str, threads: int):
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def serve(model_path: str, host: str, port: int, threads: int, max_concurrency: int) -> None:
    if host not in _LOOPBACK_HOSTS:
        raise ValueError(f"the naive server listens on loopback only, not {host!r}")
    model, tokenizer = load_model(model_path, threads)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="naive-rpc"))
    pb_grpc.add_GenerationServiceServicer_to_server(NaiveServicer(model, tokenizer), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _LOGGER.info("naive server: %s on %s, %d torch threads", model_path, address, threads)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    _LOGGER.info("naive server: stopping")
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Naive reference server: model.generate per request.")
    parser.add_argument("--model", default="builtin", help="builtin, tiny (the test model) or a local folder")
    parser.add_argument("--host", default="127.0.0.1", choices=_LOOPBACK_HOSTS, help="loopback only")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--max-concurrency", type=int, default=128, help="RPC threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MODELPOOL_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from bench.inprocess import resolve_model

    serve(str(resolve_model(args.model)), args.host, args.port, args.threads, args.max_concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
