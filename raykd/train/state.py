"""A fit's full training state in a folder: what a restarted worker needs to continue exactly.

Ray Train restarts a failed worker group from the latest checkpoint (``train.max_failures``); a
Tune trial continues from one (a resumed trial, a PBT exploit). Continuing *exactly* — the same
weights, curve and accuracy as a run that never failed — needs every piece of state the next
epoch reads, not only the student:

- ``model.safetensors``  the student (self-describing: ``raykd.train.checkpoint``);
- ``loss.safetensors``   the loss terms' learned modules (FitNets' regressors, FT's paraphraser
  and translator, connectors) and buffers, when the loss has any;
- ``optimizer.pt``, ``scheduler.pt``  their state dicts, read back with ``weights_only=True``;
- ``rng-rank{R}.safetensors``  rank R's torch RNG state (CPU, and CUDA when used): dropout and
  anything else drawn from the global generator. Every rank writes its own file; Ray Train
  merges the ranks' checkpoint folders into one. The data order and augmentation draws need
  nothing here: they come from generators seeded by (seed, epoch) at the start of each epoch;
- ``scaler.pt``  fp16's grad scaler (``train.precision``), when there is one;
- ``best.safetensors``   the best-so-far weights (``train.keep_checkpoint: best``);
- ``state.json``  the epoch, its metrics, the phase, the best-so-far record and the history of
  every epoch so far, so a resumed fit reports all of its epochs.

Tensors go to safetensors and plain state to JSON; no pickle anywhere.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE = "state.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _rng_state(device: torch.device | None) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Restored:
    """What :func:`read_state` hands back besides the modules it loaded in place."""

    next_epoch: int
    best: dict[str, Any] | None  # {epoch, val_accuracy, val_loss, state} or None
    history: list[dict[str, float]] = field(default_factory=list)
    last_ended_at: float | None = None  # when the checkpointed epoch ended (time.time())
    scheduler_restored: bool = False


def write_state(folder: str | Path, *, rank: int, model: nn.Module, loss: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler, spec: dict, info, epoch: int,
                metrics: dict, phase_id: int, best: dict | None,
                history: list[dict[str, float]], device: torch.device | None = None,
                precision=None) -> Path:
    """Write this rank's part of the state to ``folder``: every rank its RNG state, rank 0 the
    rest (its weights, optimiser and history are the group's: DDP keeps ranks in step)."""
    from raykd.train.checkpoint import save_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_rng_state(device), str(folder / rng_file(rank)))
    if rank != 0:
        return folder
    save_checkpoint(model, spec, info, folder)
    loss_state = {k: v.detach().cpu().contiguous() for k, v in loss.state_dict().items()}
    if loss_state:
        save_file(loss_state, str(folder / "loss.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    if precision is not None and precision.state_dict():  # fp16's grad scaler
        torch.save(precision.state_dict(), folder / "scaler.pt")
    record = None
    if best is not None:
        save_checkpoint(best["state"], spec, info, folder / "best.safetensors")
        record = {k: v for k, v in best.items() if k != "state"}
    (folder / STATE).write_text(json.dumps(
        {"epoch": epoch, "metrics": metrics, "phase": phase_id, "best": record,
         "history": history}))
    return folder


def read_phase(folder: str | Path) -> int | None:
    state = Path(folder) / STATE
    return json.loads(state.read_text()).get("phase") if state.is_file() else None


def read_state(folder: str | Path, *, rank: int, model: nn.Module, loss: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler,
               device: torch.device | None = None, precision=None) -> Restored:
    """Load a folder written by :func:`write_state` into the given modules (in place)."""
    folder = Path(folder)
    state = json.loads((folder / STATE).read_text())
    from raykd.train.checkpoint import load_weights

    missing, unexpected = load_weights(model, load_file(str(folder / "model.safetensors")))
    if missing or unexpected:  # strict, apart from tied weights stored once
        raise RuntimeError(f"checkpoint {folder} does not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if (folder / "loss.safetensors").is_file():
        loss.load_state_dict(load_file(str(folder / "loss.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    restored_scheduler = False
    if scheduler is not None and (folder / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        restored_scheduler = True
    if precision is not None and (folder / "scaler.pt").is_file():
        precision.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    # A group restarted with fewer workers than wrote the checkpoint takes rank 0's state.
    rng = folder / rng_file(rank) if (folder / rng_file(rank)).is_file() else folder / rng_file(0)
    if rng.is_file():
        _set_rng_state(load_file(str(rng)), device)
    best = None
    if state.get("best") and (folder / "best.safetensors").is_file():
        best = {**state["best"], "state": load_file(str(folder / "best.safetensors"))}
    metrics = state.get("metrics") or {}
    return Restored(next_epoch=state["epoch"] + 1, best=best, history=state.get("history", []),
                    last_ended_at=metrics.get("_ended_at"), scheduler_restored=restored_scheduler)


def restore_phase(model, loss, optimizer, scheduler, phase_id: int, resume_from=None,
                  rank: int = 0, device=None, precision=None):
    """Resume after a worker failure from Ray Train's latest checkpoint when it belongs to this
    phase (else from ``resume_from``, a checkpoint handed in by a Tune trial): the student, the
    loss's learned modules, optimiser, LR schedule and this rank's RNG.
    Returns (:class:`Restored` or None, whether it follows a failure)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if read_phase(d) != phase_id:
                ckpt = None  # an earlier phase's checkpoint: this phase starts afresh
    after_failure = ckpt is not None
    ckpt = ckpt or resume_from
    if ckpt is None:
        return None, False
    with ckpt.as_directory() as d:
        return read_state(d, rank=rank, model=model, loss=loss, optimizer=optimizer,
                          scheduler=scheduler, device=device, precision=precision), after_failure


def save_phase_checkpoint(model, loss, optimizer, scheduler, spec: dict, info, epoch: int,
                          metrics: dict, phase_id: int, best: dict | None, history: list,
                          rank: int = 0, device=None, precision=None):
    """Every rank's checkpoint folder (Ray Train merges them): write_state."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="raykd-ckpt-")
    write_state(tmp, rank=rank, model=model, loss=loss, optimizer=optimizer,
                scheduler=scheduler, spec=spec, info=info, epoch=epoch, metrics=metrics,
                phase_id=phase_id, best=best, history=history, device=device,
                precision=precision)
    return ray.train.Checkpoint.from_directory(tmp)
