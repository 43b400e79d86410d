"""The worker process: pins its devices, loads one model, then runs the engine loop.

`run_worker` is the target of a `spawn`ed process. It sets CUDA_VISIBLE_DEVICES
and thread counts *before* importing torch (nothing this module imports at the
top level pulls torch in), loads the model (with a device map, also an offload
folder of its own, removed when the process ends), reports `WorkerReady` with
its placement, then loops: take every new request and cancellation from its
inbox, run one engine step, send one `StepOutput` with that step's events. It
blocks on the inbox only when idle.

Requests come in over a one-way pipe whose write end only the frontend holds:
when the frontend dies, the worker reads EOF and exits at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback

from workers.faults import Faults
from workers.json_log import JsonFormatter
from workers.messages import (
    AbortCall,
    DeviceMemory,
    ErrorKind,
    GenerateCall,
    StepOutput,
    StopWorker,
    WorkerFailed,
    WorkerMemory,
    WorkerReady,
    WorkerSpec,
)

_LOGGER = logging.getLogger(__name__)
# Imports of torch and transformers count in a worker's load time: they are a good part of it.
_PROCESS_START = time.monotonic()


def read_memory() -> WorkerMemory:
    import psutil
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            _, total = torch.cuda.mem_get_info(i)
            devices.append(
                DeviceMemory(
                    device=f"cuda:{i}",
                    allocated=torch.cuda.memory_allocated(i),
                    reserved=torch.cuda.memory_reserved(i),
                    max_allocated=torch.cuda.max_memory_allocated(i),
                    total=total,
                )
            )
    return WorkerMemory(resident_bytes=psutil.Process().memory_info().rss, devices=tuple(devices))


def load_engine(spec: WorkerSpec, offload=None):
    """Load the model with its placement; returns (engine, WorkerReady). `offload`: the OffloadFolder the caller
    removes; without one, weights offloaded to disk can only be read in place from safetensors checkpoints."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workers.engine import Engine
    from workers.lean_layers import lean_layers
    from workers.packed_linear import pack_linears
    from workers.placement import (
        check_tied_weights,
        describe,
        describe_placement,
        from_pretrained_kwargs,
        input_device,
    )

    config = AutoConfig.from_pretrained(spec.model_path)
    kwargs = from_pretrained_kwargs(config, spec.dtype, spec.device_map, spec.max_memory)
    if "device_map" in kwargs and offload is not None:
        # Weights a device map sends to disk are read in place from safetensors checkpoints; others (and weights
        # converted on load) are rewritten, into a folder of this worker's own.
        kwargs["offload_folder"] = offload.make()
    _LOGGER.info("%s: loading %s with %s", spec.worker_key, spec.model_path, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    model = AutoModelForCausalLM.from_pretrained(spec.model_path, **kwargs)
    if "device_map" not in kwargs and torch.cuda.is_available():
        # transformers wraps `to` in a decorator whose type mypy reads wrong
        model.to(torch.device("cuda:0"))  # type: ignore[arg-type]
    model.eval()
    check_tied_weights(model)
    if spec.cpu_linear == "onednn" and pack_linears(model):
        lean_layers(model)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    engine = Engine(
        model,
        tokenizer,
        device=input_device(model),
        eos_token_ids=eos_ids,
        max_batch_size=spec.max_batch_size,
        max_batch_tokens=spec.max_batch_tokens,
        max_step_tokens=spec.max_step_tokens,
        prefix_cache_bytes=spec.prefix_cache_bytes,
        max_overtakes=spec.max_overtakes,
    )
    devices, summary = describe(model)
    ready = WorkerReady(
        worker_key=spec.worker_key,
        pid=os.getpid(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        devices=devices,
        device_map_summary=summary,
        context_length=int(getattr(config, "max_position_embeddings", 0) or 0),
        memory=read_memory(),
        placement=describe_placement(model, offload.path if offload is not None else ""),
    )
    return engine, ready


# Messages taken from the inbox before a step: bounds the time a flood of arrivals can delay the batch.
_MAX_MESSAGES_PER_STEP = 1024


def _drain(inbox, block: bool, timeout: float) -> list:
    """Every message waiting in the inbox (waiting up to `timeout` for one when `block`); EOFError once the
    frontend is gone."""
    messages = []
    if inbox.poll(timeout if block else 0):
        messages.append(inbox.recv())
        while len(messages) < _MAX_MESSAGES_PER_STEP and inbox.poll(0):
            messages.append(inbox.recv())
    return messages


def serve_loop(spec: WorkerSpec, engine, inbox, results) -> None:
    """Run until a StopWorker arrives or the frontend is gone. `inbox` is the read end of a pipe, `results` the
    write end of another."""
    next_memory = time.monotonic() + spec.memory_interval_s
    while True:
        try:
            messages = _drain(inbox, block=not engine.has_work, timeout=spec.memory_interval_s)
        except EOFError:
            # The frontend is gone (killed outright: no StopWorker): do not keep its model (and GPU) forever.
            _LOGGER.warning("%s: the frontend is gone; exiting", spec.worker_key)
            return
        events, aborts = [], set()
        for message in messages:
            if isinstance(message, StopWorker):
                events.extend(engine.abort_all(ErrorKind.INTERNAL, "worker stopped"))
                if events:
                    results.send(StepOutput(worker_key=spec.worker_key, events=events))
                return
            if isinstance(message, GenerateCall):
                error = engine.add(message)
                if error is not None:
                    events.append(error)
            elif isinstance(message, AbortCall):
                aborts.add(message.request_id)
        if aborts:
            events.extend(engine.abort(aborts))
        kind, seconds = "", 0.0
        if engine.has_work:
            started = time.perf_counter()
            kind, step_events = engine.step()
            seconds = time.perf_counter() - started
            events.extend(step_events)
        memory = None
        if time.monotonic() >= next_memory:
            memory = read_memory()
            next_memory = time.monotonic() + spec.memory_interval_s
        if events or memory is not None or kind or messages:
            hits, hit_tokens, cache_bytes = engine.take_prefix_counts()
            results.send(
                StepOutput(
                    worker_key=spec.worker_key,
                    events=events,
                    running=len(engine.running) + len(engine.prefilling),
                    waiting=len(engine.waiting),
                    batch_tokens=engine.batch_tokens,
                    step_kind=kind,
                    step_seconds=seconds,
                    decoded=engine.last_decoded if kind else 0,
                    prefix_cache_hits=hits,
                    prefix_cache_hit_tokens=hit_tokens,
                    prefix_cache_bytes=cache_bytes,
                    memory=memory,
                )
            )


def default_environment(spec: WorkerSpec) -> dict[str, str]:
    """Variables a worker sets unless its environment already does."""
    env = {"OMP_NUM_THREADS": str(spec.threads), "TOKENIZERS_PARALLELISM": "false"}
    if not spec.cuda_visible_devices:
        # A CPU worker: attention reads grouped key/value heads in place (SDPA's enable_gqa) instead of
        # transformers copying every cached key and value once per query head in every layer at every step, a
        # copy that grows with the context (a 32-token prompt chunk at a 6k context: 0.35 s instead of 0.73 s; same
        # tokens). Not on a GPU, where with an attention mask it would force SDPA's slowest kernel.
        env["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    return env


def apply_default_environment(spec: WorkerSpec) -> None:
    """Set `default_environment(spec)` where the environment does not already; before torch is imported."""
    for name, value in default_environment(spec).items():
        os.environ.setdefault(name, value)


def run_worker(spec: WorkerSpec, inbox, results) -> None:
    """Process entry point (spawn target). `inbox`: a pipe's read end; `results`: another pipe's write end."""
    # Before torch is imported: which GPUs this process sees, and how many CPU threads it uses.
    os.environ["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
    apply_default_environment(spec)
    # No progress bars in a worker's log; tqdm's bar also takes a multiprocessing lock (a named semaphore) that a
    # killed worker would leave to the resource tracker, which then warns about it at the server's exit.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    handler = logging.StreamHandler()
    if os.environ.get("MODELPOOL_LOG_FORMAT") == "json":
        handler.setFormatter(JsonFormatter(static={"worker": spec.worker_key}))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s worker[{spec.worker_key}] %(name)s: %(message)s")
        )
    logging.basicConfig(level=os.environ.get("MODELPOOL_LOG_LEVEL", "INFO"), handlers=[handler])
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(spec.threads)
    from workers.placement import OffloadFolder

    faults = Faults.for_model(spec.model_name)
    if faults.load_hang:
        _LOGGER.warning("%s: injected fault: hanging instead of loading", spec.worker_key)
        while True:
            time.sleep(3600)
    if faults.load_gate:
        _LOGGER.warning("%s: injected fault: waiting for %s before loading", spec.worker_key, faults.load_gate)
        while not os.path.exists(faults.load_gate):
            time.sleep(0.05)
    # Removed however the worker ends but killed (then it is left in the temporary folder).
    offload = OffloadFolder(spec.worker_key, spec.offload_folder)
    try:
        _load_and_serve(spec, inbox, results, faults, offload)
    finally:
        offload.remove()


def _load_and_serve(spec: WorkerSpec, inbox, results, faults: Faults, offload) -> None:
    try:
        engine, ready = load_engine(spec, offload)
        engine.model = faults.wrap_model(engine.model)
        ready = dataclasses.replace(ready, load_seconds=time.monotonic() - _PROCESS_START)
    except Exception as exc:  # noqa: BLE001  (reported to the frontend, which decides)
        _LOGGER.error("failed to load %s: %s", spec.model_path, traceback.format_exc())
        results.send(WorkerFailed(worker_key=spec.worker_key, error=f"{type(exc).__name__}: {exc}"))
        return
    try:
        results.send(ready)
        _LOGGER.info("%s ready: dtype=%s devices=%s", spec.worker_key, ready.dtype, ready.devices)
        serve_loop(spec, engine, inbox, results)
    except BrokenPipeError:
        _LOGGER.warning("%s: the frontend is gone; exiting", spec.worker_key)
