"""The server's configuration: a TOML file, or CLI flags for the common case.

```toml
[server]
host = "127.0.0.1"
port = 50051
metrics_port = 8002          # 0 turns /metrics off (8002 as Triton: 9090 is Prometheus' own)
drain_timeout_s = 30
worker_load_timeout_s = 600  # a worker still loading after this is killed and restarted
default_model = "smollm2"    # default: the first model
reflection = true            # gRPC server reflection (grpcurl list/describe)

[tls]                        # TLS on the gRPC port; certificate files re-read when they change or on SIGHUP
cert = "/etc/modelpool/server.pem"
key = "/etc/modelpool/server.key"
client_ca = "/etc/modelpool/clients-ca.pem"   # mutual TLS: clients need a certificate this CA signed
metrics = false              # serve /metrics over TLS too, with the same certificate

[auth]                       # bearer tokens: auth is on when any token is configured
tokens_file = "/etc/modelpool/tokens.toml"    # [[tokens]] name, token, models, max_in_flight (service/auth.py)
tokens_env = "MODELPOOL_AUTH_TOKENS"          # this variable may hold "name=token,name=token" too
max_in_flight_per_token = 0  # requests one token may have queued or running; 0 = no limit

[limits]
max_receive_message_bytes = 4194304           # one request message (RESOURCE_EXHAUSTED above it)
max_chat_messages = 256
max_stop_sequences = 16
max_stop_sequence_chars = 256
max_concurrent_streams = 0   # calls at once per connection (HTTP/2); more wait for a free one; 0 = gRPC's default

[[models]]
name = "smollm2"
source = "builtin"           # builtin | a local folder | hf:<repo id> | modelscope:<model id>
max_batch_size = 32          # running sequences per worker
max_batch_tokens = 16384     # prompt + max_new_tokens of every running sequence, per worker
max_step_tokens = 512        # tokens one engine step computes (decodes + prompt chunks); 0 = whole prompts at once;
                             # unset: 512 for a CPU worker, 2048 for a GPU worker (at least 2 x max_batch_size)
prefix_cache_mib = 0         # keys/values of recent prompt prefixes kept per worker for reuse; 0 = off
max_overtakes = 32           # a waiting request overtaken this many times (by higher priorities) goes first
max_queue = 256              # accepted requests waiting beyond the running capacity
stream_interval = 1          # tokens per StreamGenerate message after the first token (more: fewer messages, less CPU)
default_max_new_tokens = 256
max_input_bytes = 0          # prompt or chat contents, in bytes; 0 = 32 x the context length
max_prompt_tokens = 0        # 0 = the context length bounds it
max_new_tokens = 0           # the most a request may ask for; 0 = the context length bounds it

[[models.workers]]           # one entry per kind of worker
devices = [0, 1]             # GPUs this worker sees (CUDA_VISIBLE_DEVICES); [] = CPU only
dtype = "auto"               # auto | bfloat16 | float16 | float32
device_map = "auto"          # auto | balanced | balanced_low_0 | sequential | { module = device }
max_memory = { 0 = "20GiB", 1 = "20GiB", cpu = "30GiB" }   # keys: GPU index as the worker sees it, cpu, disk
offload_folder = ""          # a folder of the worker's own is made in it for rewritten offloaded weights; "" = TMPDIR
replicas = 1                 # identical workers with these settings
threads = 0                  # torch CPU threads; 0 = split the machine's cores among CPU workers
cpu_linear = "onednn"        # a float32 model whole on the CPU: oneDNN products on weights packed at load (and the lean
                             # forward for Llama-family layers), or "aten": torch's layers, transformers' forward
```

Placement: devices are GPU indices as the worker sees them (0 is the first of `devices`), "cpu" or "disk". A
table such as `{ "model.embed_tokens" = "cpu", "model.layers.0" = 0, "model.layers.1" = "disk", ... }` places
each module (modules sharing a weight, like a tied lm_head and embed_tokens, on one device); a strategy spreads
the model over the GPUs and then "cpu" and "disk" within `max_memory`. Without a GPU a strategy applies only when
`max_memory` caps "cpu" (the rest goes to disk); with no cap the model stays on the CPU whole. Weights on disk are
read in place from safetensors checkpoints, or rewritten into the worker's offload folder (removed when it exits).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.messages import WorkerSpec

_DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_CPU_LINEAR = ("onednn", "aten")  # workers/packed_linear.py
# What accelerate reads as a size: bytes, or a number with one of these units (its lower-case "b" means bits).
_SIZE = re.compile(r"\d+(\.\d+)?(GiB|MiB|KiB|GB|MB|KB)")


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key."""


@dataclass
class WorkerGroupConfig:
    devices: list[int] = field(default_factory=list)
    dtype: str = "auto"
    device_map: str | dict[str, Any] = "auto"
    max_memory: dict[str, str | int] | None = None
    offload_folder: str = ""
    replicas: int = 1
    threads: int = 0
    cpu_linear: str = "onednn"

    def validate(self, where: str) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"{where}.dtype: {self.dtype!r} is not one of {_DTYPES}")
        if self.cpu_linear not in _CPU_LINEAR:
            raise ConfigError(f"{where}.cpu_linear: {self.cpu_linear!r} is not one of {_CPU_LINEAR}")
        if isinstance(self.device_map, dict):
            if not self.device_map:
                raise ConfigError(f"{where}.device_map: an empty table places nothing; name modules or use a strategy")
            for module, device in self.device_map.items():
                self._check_device(f"{where}.device_map.{module}", device)
            if self.max_memory:
                raise ConfigError(
                    f"{where}.max_memory: applies to a device_map strategy {_DEVICE_MAPS}, not to a table of modules"
                )
        elif self.device_map not in _DEVICE_MAPS:
            raise ConfigError(f"{where}.device_map: {self.device_map!r} is not one of {_DEVICE_MAPS} or a table")
        for device, size in (self.max_memory or {}).items():
            self._check_device(f"{where}.max_memory", device)
            if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0) and not (
                isinstance(size, str) and _SIZE.fullmatch(size)
            ):
                raise ConfigError(
                    f"{where}.max_memory.{device}: {size!r} is not a size: bytes, or a number with GiB, MiB, KiB, "
                    f'GB, MB or KB, like "20GiB"'
                )
        if self.offload_folder and not os.path.isdir(self.offload_folder):
            raise ConfigError(f"{where}.offload_folder: no such folder: {self.offload_folder}")
        if self.replicas < 1:
            raise ConfigError(f"{where}.replicas: must be at least 1")

    def _check_device(self, where: str, device: Any) -> None:
        """A device is cpu, disk, or the index of a GPU this worker sees (an integer, or digits as a TOML key)."""
        if device in ("cpu", "disk"):
            return
        index = device if isinstance(device, int) and not isinstance(device, bool) else None
        if isinstance(device, str) and device.isdigit():
            index = int(device)
        if index is None:
            raise ConfigError(f'{where}: {device!r} is not a device: use "cpu", "disk" or a GPU index')
        if index >= len(self.devices):
            sees = (
                f"GPUs 0-{len(self.devices) - 1} (devices = {self.devices})"
                if self.devices
                else "no GPU (devices = [])"
            )
            raise ConfigError(f"{where}: GPU {index}, but this worker sees {sees}; GPU indices count within devices")


@dataclass
class ModelConfig:
    name: str
    source: str = "builtin"
    revision: str | None = None
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    # Tokens one engine step computes: a decode per running sequence, the rest on prompt chunks, so a long prompt is
    # prefilled over several steps while the others keep streaming. 0: whole prompts in one step. None: by device.
    max_step_tokens: int | None = None
    # MiB per worker for the keys and values of recently seen prompt prefixes (64-token blocks, least recently
    # used out first), reused when a prompt starts with one; 0: off.
    prefix_cache_mib: int = 0
    # A waiting request that higher-priority ones overtook this many times is admitted next: none waits forever.
    max_overtakes: int = 32
    max_queue: int = 256
    # Tokens a StreamGenerate message waits for once the first token has gone out (sent as soon as it is there); the
    # last message may carry fewer. At high concurrency on few cores the frontend's and the client's work per
    # message limits throughput (bench/RESULTS.md); the server's latency metrics still see every token.
    stream_interval: int = 1
    default_max_new_tokens: int = 256
    # Prompt (or all chat contents) in bytes; larger input is refused before tokenizing. 0: 32 x context length.
    max_input_bytes: int = 0
    max_prompt_tokens: int = 0  # 0 = the context length bounds it
    max_new_tokens: int = 0  # the most a request may ask for; 0 = the context length bounds it
    workers: list[WorkerGroupConfig] = field(default_factory=lambda: [WorkerGroupConfig()])


@dataclass
class TLSConfig:
    cert: str = ""  # PEM certificate chain of the server
    key: str = ""  # PEM private key of that certificate
    client_ca: str = ""  # PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)
    metrics: bool = False  # serve /metrics over TLS too, with the same certificate

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key)

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("tls: cert and key go together")
        if (self.client_ca or self.metrics) and not self.enabled:
            raise ConfigError("tls.client_ca and tls.metrics need tls.cert and tls.key")
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"tls.{name}: no such file: {path}")


@dataclass
class AuthConfig:
    tokens_file: str = ""  # TOML file of [[tokens]] (format in service/auth.py)
    tokens_env: str = "MODELPOOL_AUTH_TOKENS"  # variable holding "name=token,name=token"; "" = not read
    max_in_flight_per_token: int = 0  # requests one token may have queued or running at once; 0 = no limit


@dataclass
class LimitsConfig:
    max_receive_message_bytes: int = 4 * 1024 * 1024  # one request message, as received
    max_chat_messages: int = 256  # chat.messages per request
    max_stop_sequences: int = 16  # stopping.stop_sequences per request
    max_stop_sequence_chars: int = 256  # characters of one stop sequence
    max_concurrent_streams: int = 0  # HTTP/2 streams (calls) at once per connection; 0 = gRPC's default


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8002
    drain_timeout_s: float = 30.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    memory_interval_s: float = 2.0
    # A worker that has not loaded its model by then is killed and restarted with back-off.
    worker_load_timeout_s: float = 600.0
    default_model: str = ""
    reflection: bool = True  # gRPC server reflection (grpcurl list/describe); off hides the schema
    models: list[ModelConfig] = field(default_factory=list)
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.models[0].name

    def validate(self) -> ServerConfig:
        if not self.models:
            raise ConfigError("models: at least one model is needed")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"models.name: duplicate names in {names}")
        self.tls.validate()
        for key, value in vars(self.limits).items():
            if value < (0 if key == "max_concurrent_streams" else 1):
                raise ConfigError(f"limits.{key}: must be at least {0 if key == 'max_concurrent_streams' else 1}")
        if self.auth.max_in_flight_per_token < 0:
            raise ConfigError("auth.max_in_flight_per_token: must not be negative")
        if self.default_model and self.default_model not in names:
            raise ConfigError(f"server.default_model: {self.default_model!r} is not one of {names}")
        for m in self.models:
            where = f"models[{m.name}]"
            if not m.name:
                raise ConfigError("models.name: must not be empty")
            for key in (
                "max_batch_size",
                "max_batch_tokens",
                "default_max_new_tokens",
                "max_overtakes",
                "stream_interval",
            ):
                if getattr(m, key) < 1:
                    raise ConfigError(f"{where}.{key}: must be at least 1")
            for key in ("max_queue", "max_input_bytes", "max_prompt_tokens", "max_new_tokens", "prefix_cache_mib"):
                if getattr(m, key) < 0:
                    raise ConfigError(f"{where}.{key}: must not be negative")
            step = m.max_step_tokens
            if step is not None and (step < 0 or 0 < step <= m.max_batch_size):
                # A step decodes every running sequence first: a budget not above the batch size could leave
                # no token for prompts, and the queue would never move.
                raise ConfigError(
                    f"{where}.max_step_tokens: must be 0 (unchunked) or more than max_batch_size "
                    f"({m.max_batch_size}), got {m.max_step_tokens}"
                )
            if not m.workers:
                raise ConfigError(f"{where}.workers: at least one worker is needed")
            for w in m.workers:
                w.validate(f"{where}.workers")
        return self

    def worker_specs(self, model: ModelConfig, model_path: str) -> list[WorkerSpec]:
        """One spec per worker process of `model`, with CPU threads split among all CPU workers."""
        specs: list[WorkerSpec] = []
        for group in model.workers:
            for _ in range(group.replicas):
                specs.append(
                    WorkerSpec(
                        worker_key=f"{model.name}/{len(specs)}",
                        model_name=model.name,
                        model_path=model_path,
                        cuda_visible_devices=",".join(str(d) for d in group.devices),
                        dtype=group.dtype,
                        device_map=group.device_map,
                        max_memory=group.max_memory,
                        offload_folder=group.offload_folder,
                        threads=group.threads or self._default_threads(),
                        cpu_linear=group.cpu_linear,
                        max_batch_size=model.max_batch_size,
                        max_batch_tokens=model.max_batch_tokens,
                        max_step_tokens=self._step_tokens(model, group),
                        prefix_cache_bytes=model.prefix_cache_mib << 20,
                        max_overtakes=model.max_overtakes,
                        memory_interval_s=self.memory_interval_s,
                    )
                )
        return specs

    @staticmethod
    def _step_tokens(model: ModelConfig, group: WorkerGroupConfig) -> int:
        if model.max_step_tokens is not None:
            return model.max_step_tokens
        # A GPU computes a few thousand prompt tokens in about the time of a decode step; a CPU does not: there a
        # smaller chunk keeps the gaps of the running streams short (bench/RESULTS.md, chunked prefill).
        base = 2048 if group.devices else 512
        return max(base, 2 * model.max_batch_size)

    def _default_threads(self) -> int:
        # Workers on one machine must split the cores, or they slow each other down.
        cpu_workers = sum(g.replicas for m in self.models for g in m.workers if not g.devices) or 1
        return max(1, (os.cpu_count() or 1) // cpu_workers)


def _build(cls, data: dict[str, Any], where: str):
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    return cls(**data)


def from_dict(data: dict[str, Any]) -> ServerConfig:
    server = dict(data.get("server", {}))
    unknown_top = set(data) - {"server", "models", "tls", "auth", "limits"}
    if unknown_top:
        raise ConfigError(f"unknown sections {sorted(unknown_top)}")
    sections = {
        "tls": _build(TLSConfig, dict(data.get("tls", {})), "tls"),
        "auth": _build(AuthConfig, dict(data.get("auth", {})), "auth"),
        "limits": _build(LimitsConfig, dict(data.get("limits", {})), "limits"),
    }
    models = []
    for i, raw in enumerate(data.get("models", [])):
        raw = dict(raw)
        groups = [_build(WorkerGroupConfig, dict(w), f"models[{i}].workers") for w in raw.pop("workers", [{}])]
        if "name" not in raw:
            raise ConfigError(f"models[{i}].name: missing")
        models.append(_build(ModelConfig, {**raw, "workers": groups}, f"models[{i}]"))
    return _build(ServerConfig, {**server, "models": models, **sections}, "server").validate()


def load(path: str) -> ServerConfig:
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return from_dict(data)


def from_flags(
    model: str,
    workers: int = 1,
    devices: list[int] | None = None,
    dtype: str = "auto",
    device_map: str = "auto",
    threads: int = 0,
    name: str | None = None,
    cpu_linear: str = "onednn",
    **server: Any,
) -> ServerConfig:
    """`--model X --workers N --devices 0,1`: N workers, the devices split evenly among them."""
    devices = devices or []
    if devices and workers > len(devices):
        raise ConfigError(f"--workers: {workers} workers need at least as many --devices, got {devices}")
    per_worker = len(devices) // workers if devices else 0
    groups = [
        WorkerGroupConfig(
            devices=devices[i * per_worker : (i + 1) * per_worker],
            dtype=dtype,
            device_map=device_map,
            threads=threads,
            cpu_linear=cpu_linear,
        )
        for i in range(workers)
    ]
    # The last part of the source, without a scheme, a hub @revision or a .gguf suffix: hf:org/tiny@v1 -> tiny.
    source = model if Path(model).expanduser().exists() else model.partition("@")[0]  # refs/pr/3 has slashes
    base = source.rstrip("/").split("/")[-1].split(":")[-1].removesuffix(".gguf")
    model_name = name or ("smollm2" if model == "builtin" else base)
    return ServerConfig(models=[ModelConfig(name=model_name, source=model, workers=groups)], **server).validate()
