"""Where a worker puts its model: dtype, device_map and max_memory turned into `from_pretrained` arguments, the
offload folder, and the final placement described for ListModels (module groups, devices, sizes)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import Counter
from typing import Any

import torch

from workers.messages import ModuleGroup, Placement

_LOGGER = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def checkpoint_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        return DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else None


def resolve_dtype(name: str, config, cuda: bool) -> torch.dtype:
    """`auto`: fp32 on a CPU; on a GPU the checkpoint's dtype, bf16 only where supported (else fp16)."""
    if name != "auto":
        return DTYPES[name]
    if not cuda:
        return torch.float32
    wanted = checkpoint_dtype(config) or torch.float32
    if wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return wanted


def _device_key(value: Any) -> Any:
    """TOML keys are strings: "0" means GPU 0, "cpu"/"disk" stay as they are."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def from_pretrained_kwargs(
    config, dtype: str, device_map: str | dict | None, max_memory: dict | None
) -> dict[str, Any]:
    """`from_pretrained` arguments for a placement. Without a GPU, a strategy (auto, sequential...) still applies
    when max_memory caps the CPU: what does not fit there goes to disk; with no cap, the model stays on the CPU
    whole. An explicit {module: device} map applies everywhere."""
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, config, cuda)}
    memory = {_device_key(k): v for k, v in (max_memory or {}).items()}
    if not cuda:
        # GPU limits of a worker that sees no GPU: left in, accelerate would count only "cpu" and "disk" and put
        # the whole model on disk when no "cpu" limit is given.
        ignored = sorted(k for k in memory if isinstance(k, int))
        if ignored:
            _LOGGER.warning("no GPU visible: max_memory of GPUs %s ignored", ignored)
        memory = {k: v for k, v in memory.items() if not isinstance(k, int)}
    if isinstance(device_map, dict):
        kwargs["device_map"] = {module: _device_key(dev) for module, dev in device_map.items()}
    elif device_map and (cuda or memory):
        kwargs["device_map"] = device_map
    if memory and "device_map" in kwargs:
        kwargs["max_memory"] = memory
    return kwargs


def device_name(value: Any) -> str:
    """A device map's value as people read it: GPU 1 -> "cuda:1"; "cpu", "disk", "cuda:0" as they are."""
    return f"cuda:{value}" if isinstance(value, int) else str(value)


def _hf_device_map(model) -> dict[str, Any]:
    return dict(getattr(model, "hf_device_map", None) or {})


def _group_of(name: str, groups: list[str]) -> str | None:
    """The device-map entry holding the parameter or module `name`: the longest prefix of it ("" holds all)."""
    holding = [g for g in groups if g == "" or name == g or name.startswith(g + ".")]
    return max(holding, key=len, default=None)


def input_device(model) -> torch.device:
    """Where input ids go: the device of the embedding layer (the first of a model-parallel split), or, when its
    weight is offloaded (on "meta" between forward passes), the device accelerate runs it on."""
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    if device.type != "meta":
        return device
    hook = getattr(embeddings, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    return torch.device(device_name(execution)) if execution is not None else torch.device("cpu")


def describe(model) -> tuple[tuple[str, ...], dict[str, int]]:
    """Devices holding the model (from its device map when it has one: offloaded weights sit on "meta"), and the
    device map as device -> number of modules."""
    hf_map = _hf_device_map(model)
    if hf_map:
        summary = Counter(device_name(d) for d in hf_map.values())
        return tuple(sorted(summary)), dict(summary)
    devices = sorted({str(p.device) for p in model.parameters()})
    return tuple(devices), ({devices[0]: 1} if devices else {})


def module_groups(model) -> tuple[ModuleGroup, ...]:
    """The final device map in its order, each group with the bytes of its parameters and buffers; a model
    without a map is one group, "", on the device of its parameters."""
    hf_map = _hf_device_map(model)
    if not hf_map:
        devices = sorted({str(p.device) for p in model.parameters()}) or ["cpu"]
        hf_map = {"": devices[0]}
    names = list(hf_map)
    sizes = dict.fromkeys(names, 0)
    # named_parameters() yields a tied weight once, under the first module holding it.
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        group = _group_of(name, names)
        if group is not None:
            sizes[group] += tensor.numel() * tensor.element_size()
    return tuple(ModuleGroup(module=n, device=device_name(hf_map[n]), size_bytes=sizes[n]) for n in names)


def check_tied_weights(model) -> None:
    """Modules sharing a weight (an output layer tied to the embeddings) must be on one device: accelerate keeps
    one copy where the first of them is, and the other fails at its first forward pass (a KeyError for one
    offloaded to disk). Refused at load time instead, with the modules named."""
    hf_map = _hf_device_map(model)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if not hf_map or not tied:
        return
    names = list(hf_map)
    for target, source in tied.items():
        target_group, source_group = _group_of(target, names), _group_of(source, names)
        if target_group is None or source_group is None:
            continue
        target_device, source_device = device_name(hf_map[target_group]), device_name(hf_map[source_group])
        if target_device != source_device:
            raise ValueError(
                f"device_map puts {target_group!r} on {target_device} and {source_group!r} on {source_device}, "
                f"but they share a weight ({target} is tied to {source}): put both on the same device"
            )


def folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def describe_placement(model, offload_folder: str) -> Placement:
    import psutil

    return Placement(
        module_groups=module_groups(model),
        host_memory_total=psutil.virtual_memory().total,
        offload_folder=offload_folder,
        offload_folder_bytes=folder_bytes(offload_folder) if offload_folder else 0,
        offload_filesystem_total=shutil.disk_usage(offload_folder).total if offload_folder else 0,
    )


class OffloadFolder:
    """A worker's own folder for weights offloaded to disk that must be rewritten (not safetensors, or converted
    on load): made under `parent` (the system's temporary folder when "") on first use, removed at exit. Its own,
    because workers of one model (or of two servers) would otherwise overwrite each other's files."""

    def __init__(self, worker_key: str, parent: str = ""):
        self._prefix = "modelpool-offload-" + "".join(c if c.isalnum() else "-" for c in worker_key) + "-"
        self._parent = parent or None
        self.path = ""

    def make(self) -> str:
        if not self.path:
            self.path = tempfile.mkdtemp(prefix=self._prefix, dir=self._parent)
        return self.path

    def remove(self) -> None:
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = ""
