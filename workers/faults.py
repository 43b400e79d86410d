"""Fault injection for the reliability tests; off unless the MODELPOOL_FAULTS environment variable names a fault.

Only the trigger is fake: the code that handles the fault (out-of-memory
recovery in the engine, the frontend's load timeout) is the real one.

    MODELPOOL_FAULTS="stuck:load_hang,tiny:oom_prompt_tokens=100,tiny:slow_step_ms=50"

Each entry is `<model name>:<fault>[=<value>]`; faults of other models are ignored.
- `load_hang`: the worker never finishes loading its model.
- `load_gate=PATH`: the worker starts loading its model only once PATH exists, so
  that a test can hold it in the loading state for as long as it needs.
- `oom_prompt_tokens=N`: a prefill (or a prompt chunk) whose prompt reaches past
  N tokens runs out of device memory (`torch.OutOfMemoryError`, as CUDA raises it).
- `slow_step_ms=N`: every forward pass takes N ms longer, like a slow device, so
  that tests can hold requests in flight for as long as they need.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "MODELPOOL_FAULTS"


@dataclass(frozen=True)
class Faults:
    load_hang: bool = False
    load_gate: str = ""
    oom_prompt_tokens: int = 0
    slow_step_ms: int = 0

    @classmethod
    def for_model(cls, model_name: str, spec: str | None = None) -> Faults:
        spec = os.environ.get(ENV, "") if spec is None else spec
        values: dict[str, object] = {}
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            model, _, fault = entry.partition(":")
            if model != model_name:
                continue
            name, _, value = fault.partition("=")
            if name == "load_hang":
                values["load_hang"] = True
            elif name == "load_gate":
                values["load_gate"] = value
            elif name in ("oom_prompt_tokens", "slow_step_ms"):
                values[name] = int(value)
            else:
                raise ValueError(f"{ENV}: unknown fault {name!r}")
        return cls(**values)  # type: ignore[arg-type]

    @property
    def any(self) -> bool:
        return self != Faults()

    def wrap_model(self, model):
        return _FaultyModel(model, self) if self.oom_prompt_tokens or self.slow_step_ms else model


class _FaultyModel:
    """Calls the model, with the configured faults around each forward pass."""

    def __init__(self, model, faults: Faults):
        self._model, self._faults = model, faults

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, input_ids, **kwargs):
        import torch

        limit = self._faults.oom_prompt_tokens
        # A chunk of a long prompt counts up to where it ends (its last position), so chunking cannot dodge the fault.
        positions = kwargs.get("position_ids")
        reach = int(positions.max()) + 1 if positions is not None and input_ids.shape[1] > 1 else input_ids.shape[1]
        if limit and reach > limit:
            raise torch.OutOfMemoryError(f"injected fault: out of memory on a prefill reaching {reach} tokens")
        if self._faults.slow_step_ms:
            time.sleep(self._faults.slow_step_ms / 1000)
        return self._model(input_ids=input_ids, **kwargs)
