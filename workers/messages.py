"""Every message that crosses the process boundary between the frontend and a worker.

Plain picklable dataclasses, no protobuf and no torch: the frontend converts
protobuf into these at the gRPC edge, workers never see gRPC. Each message about
a request carries its `request_id`. Workers send one `StepOutput` per engine
step, holding that step's events for every sequence in the batch, so queue
traffic grows with steps, not with tokens times requests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.IntEnum):
    """Why a sequence ended. Values match the protobuf enum for a trivial conversion."""

    UNSPECIFIED = 0
    LENGTH = 1
    END_OF_SEQUENCE = 2
    STOP_SEQUENCE = 3
    # Not in the protobuf enum: the frontend aborted it (client cancelled, deadline).
    ABORTED = 100
    # Not in the protobuf enum: the request failed inside the worker (see `error`).
    ERROR = 101


class ErrorKind(enum.Enum):
    """Failure classes a worker can report for one request; mapped to gRPC codes in service/errors.py."""

    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    INTERNAL = "internal"


# ---------------------------------------------------------------- frontend -> worker


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerateCall:
    """A validated, tokenized request sent to one worker."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    # time.time() when the frontend accepted the call; used for queue time.
    arrival_time: float
    # The call's x-request-id, for log lines about it.
    request_label: str = ""
    # Larger is admitted first (see workers/scheduler.py); 0 is the default.
    priority: int = 0


@dataclass(frozen=True)
class AbortCall:
    """Drop a request's sequence (client cancelled or deadline passed)."""

    request_id: int


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to start: given as the process's argument."""

    worker_key: str  # "<model>/<index>", unique in the server
    model_name: str
    model_path: str  # a local folder, resolved by the frontend
    cuda_visible_devices: str  # "" hides every GPU
    dtype: str = "auto"
    device_map: str | dict[str, object] | None = "auto"
    max_memory: dict[str, str | int] | None = None
    # Where the worker makes its own folder for offloaded weights that must be rewritten; "" = the temporary folder.
    offload_folder: str = ""
    threads: int = 1
    # Matrix products of a float32 model whole on the CPU: "onednn" (weights packed at load) or "aten" (nn.Linear).
    cpu_linear: str = "onednn"
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    # Tokens one engine step computes (decodes plus prompt chunks); 0 = whole prompts in one step.
    max_step_tokens: int = 512
    # Bytes of recently seen prompt prefixes' keys and values kept for reuse; 0 = no prefix cache.
    prefix_cache_bytes: int = 0
    max_overtakes: int = 32
    memory_interval_s: float = 2.0


@dataclass(frozen=True)
class StopWorker:
    """Sentinel: finish nothing more, exit the loop and the process."""


# ---------------------------------------------------------------- worker -> frontend


@dataclass(frozen=True)
class DeviceMemory:
    """torch.cuda.memory_* numbers for one visible device, in bytes."""

    device: str
    allocated: int
    reserved: int
    max_allocated: int
    total: int


@dataclass(frozen=True)
class WorkerMemory:
    """Memory numbers of one worker process; reading them is not free, so sent every few seconds."""

    resident_bytes: int
    devices: tuple[DeviceMemory, ...] = ()


@dataclass(frozen=True)
class ModuleGroup:
    """One entry of a worker's final device map: a module ("" for the whole model) and the device holding it."""

    module: str
    device: str  # "cuda:0" (as the worker numbers its GPUs), "cpu" or "disk"
    # Its parameters and buffers; a weight shared by tied modules counts once, in the first of them.
    size_bytes: int


@dataclass(frozen=True)
class Placement:
    """Where a worker put its model, and the sizes that stay fixed once it is loaded (sent once, in WorkerReady).

    The numbers that change (resident memory, CUDA memory) come in the periodic `WorkerMemory` reports;
    `device_memory` puts both together, so the frontend never has to ask a busy worker."""

    module_groups: tuple[ModuleGroup, ...]
    # The machine's memory: the total of "cpu".
    host_memory_total: int
    # The worker's own folder for offloaded weights that had to be rewritten; "" when it has none.
    offload_folder: str = ""
    # Bytes the worker wrote there: 0 when the offloaded weights are read in place from the checkpoint's
    # safetensors files, which transformers does whenever it can.
    offload_folder_bytes: int = 0
    # The size of the filesystem holding the offload folder: the total of "disk".
    offload_filesystem_total: int = 0

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g.device for g in self.module_groups))

    def device_memory(self, memory: WorkerMemory | None) -> tuple[DeviceMemory, ...]:
        """Allocated, reserved and total bytes of every GPU the worker sees, of the host ("cpu": the process's
        resident memory and the machine's memory) and, when weights are offloaded, of "disk", from `memory`
        (the worker's latest report) and this placement."""
        rss = memory.resident_bytes if memory else 0
        result = list(memory.devices if memory else ())
        result.append(DeviceMemory("cpu", allocated=rss, reserved=rss, max_allocated=rss, total=self.host_memory_total))
        offloaded = sum(g.size_bytes for g in self.module_groups if g.device == "disk")
        if "disk" in self.devices:
            result.append(
                DeviceMemory(
                    "disk",
                    allocated=offloaded,
                    reserved=self.offload_folder_bytes,
                    max_allocated=offloaded,
                    total=self.offload_filesystem_total,
                )
            )
        return tuple(result)


@dataclass(frozen=True)
class WorkerReady:
    """The model is loaded; sent once after start."""

    worker_key: str
    pid: int
    # CUDA_VISIBLE_DEVICES as the worker process itself sees it.
    cuda_visible_devices: str
    dtype: str
    devices: tuple[str, ...]
    device_map_summary: dict[str, int]
    context_length: int
    memory: WorkerMemory
    # Seconds from the process start to the model ready (imports, load, placement).
    load_seconds: float = 0.0
    placement: Placement | None = None


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not start (model load failed); the process exits after sending it."""

    worker_key: str
    error: str


@dataclass
class SequenceEvent:
    """What happened to one sequence in one step."""

    request_id: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # time.time() when the worker took the request into its batch (set on its first event).
    start_time: float | None = None
    error_kind: ErrorKind | None = None
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason != FinishReason.UNSPECIFIED


@dataclass
class StepOutput:
    """One engine step's events for every sequence it touched, plus the worker's numbers."""

    worker_key: str
    events: list[SequenceEvent]
    # Sequences admitted (in the running batch or prefilling their prompt) and waiting for a place, after this step.
    running: int = 0
    waiting: int = 0
    # Tokens reserved by the admitted sequences (prompt + max_new_tokens of each).
    batch_tokens: int = 0
    # "prefill", "decode", "mixed" (decodes and prompt chunks), or "" when no model step ran (only aborts or a
    # memory report).
    step_kind: str = ""
    step_seconds: float = 0.0
    # Sequences the step decoded (a "mixed" step also prefilled prompt chunks).
    decoded: int = 0
    # Prompts that found a cached prefix since the last StepOutput, the tokens it covered, and the cache's size.
    prefix_cache_hits: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_bytes: int = 0
    # Set every `memory_interval_s` seconds, None otherwise.
    memory: WorkerMemory | None = None
