"""Where a worker puts its model: dtype, device_map and max_memory turned into `from_pretrained` arguments."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

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
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, config, cuda)}
    if isinstance(device_map, dict):
        kwargs["device_map"] = {module: _device_key(dev) for module, dev in device_map.items()}
    elif device_map and cuda:
        kwargs["device_map"] = device_map
    # With no GPU visible the model stays on the CPU; accelerate's strategies have nothing to spread.
    if max_memory and "device_map" in kwargs:
        kwargs["max_memory"] = {_device_key(k): v for k, v in max_memory.items()}
    return kwargs


def input_device(model) -> torch.device:
    """Where input ids go: the device of the embedding layer (the first of a model-parallel split)."""
    return model.get_input_embeddings().weight.device


def describe(model) -> tuple[tuple[str, ...], dict[str, int]]:
    """Devices holding parameters, and the device map as device -> number of modules."""
    devices = sorted({str(p.device) for p in model.parameters()})
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map:
        summary = Counter(f"cuda:{d}" if isinstance(d, int) else str(d) for d in hf_map.values())
    else:
        summary = Counter({devices[0]: 1}) if devices else Counter()
    return tuple(devices), dict(summary)
