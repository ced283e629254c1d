"""``train.precision``: the student's forward under autocast, the loss in float32.

- ``fp32`` (default): nothing changes.
- ``bf16``: the student's forward runs under ``torch.autocast`` in bfloat16 (CUDA or CPU).
  bfloat16 keeps float32's exponent range, so gradients need no scaling.
- ``fp16``: the same in float16, with ``torch.amp.GradScaler`` (float16 gradients underflow
  without it). CUDA only: the config refuses fp16 without ``train.use_gpu`` (CPU autocast in
  float16 is slower than float32 on most CPUs and gives nothing bf16 does not).

The loss terms run outside autocast on float32 copies of the student's logits and features:
softmax, log-softmax, KL and feature distances in half precision lose the small differences
distillation learns from. Learned loss modules (connectors, regressors) run in float32 too.
Evaluation runs in float32. The grad scaler's state goes into checkpoints (``scaler.pt``), so a
restarted fit continues with the scale it had reached.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device | str):
        device = torch.device(device)
        if name not in DTYPES:
            raise ValueError(f"train.precision: {name!r} is not one of {', '.join(DTYPES)}")
        if name == "fp16" and device.type != "cuda":
            # The config refuses this before anything starts; a worker given no GPU says so too.
            raise ValueError(f"train.precision: fp16 needs a CUDA device, this worker has "
                             f"{device}; use bf16 on CPU")
        self.name, self.device_type, self.dtype = name, device.type, DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        """The context the student's forward runs in."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def full(self):
        """The context the loss runs in: autocast off (a no-op under fp32)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, enabled=False)

    def backward_step(self, total: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``total.backward(); optimizer.step()``, through the grad scaler under fp16 (which
        skips the step when a gradient is inf/NaN and lowers the scale)."""
        if self.scaler is None:
            total.backward()
            optimizer.step()
            return
        self.scaler.scale(total).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def to_float32(value: Any) -> Any:
    """Floating tensors (also inside dicts, lists, tuples) as float32; the rest as it is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float64 \
            else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_float32(v) for v in value)
    return value
