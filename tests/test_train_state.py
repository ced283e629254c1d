"""A checkpoint holds the whole training state (raykd.train.state): a fit restored from it
continues exactly as one that never stopped — the student, the loss's learned regressor, the
optimiser, the LR schedule and the dropout RNG included. No Ray: the folder round trip only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from raykd.config import DistillConfig, LossTermConfig
from raykd.losses import DistillLoss
from raykd.models.mlp import MLP
from raykd.train.step import DistillStep
from raykd.train.state import read_state, rng_file, write_state

INFO = SimpleNamespace(input_shape=(1, 8, 8), num_classes=10)
SPEC = {"name": "mlp", "args": {"hidden_sizes": [32], "dropout": 0.3}}
TEACHER_WIDTH = 48  # the regressor maps the student's 32 features to it: learned parameters


def build(seed: int):
    torch.manual_seed(seed)
    student = MLP(64, 10, [32], 0.3, 0.0)
    distill = DistillConfig(losses=[
        LossTermConfig(name="ce"),
        LossTermConfig(name="fitnets", student_layers=["layers.0"],
                       teacher_layers=["layers.0"], params={"pretrain_epochs": 0})])
    loss = DistillLoss(distill, {"layers.0": torch.Size([2, 32])},
                       {"layers.0": torch.Size([2, TEACHER_WIDTH])})
    step = DistillStep(student, loss, ["layers.0"])
    optimizer = torch.optim.Adam(step.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 6)
    return student, loss, step, optimizer, scheduler


def data(epoch: int, batch: int):
    g = torch.Generator().manual_seed(1000 * epoch + batch)
    return (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g),
            torch.randn(16, TEACHER_WIDTH, generator=g))


def train_epoch(step, optimizer, scheduler, epoch: int) -> None:
    step.train()
    for b in range(3):
        x, y, t_feat = data(epoch, b)
        total, _ = step(x, None, y, {"layers.0": t_feat}, epoch, False)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    scheduler.step()


def states(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def test_restored_fit_continues_exactly(tmp_path):
    student, loss, step, opt, sched = build(seed=0)
    history = []
    for epoch in range(2):
        train_epoch(step, opt, sched, epoch)
        history.append({"epoch": epoch, "val_accuracy": 0.5 + epoch / 10})
    write_state(tmp_path, rank=0, model=student, loss=loss, optimizer=opt, scheduler=sched,
                spec=SPEC, info=INFO, epoch=1, metrics=history[-1], phase_id=3, best=None,
                history=history)
    saved_loss = {k: v.clone() for k, v in loss.state_dict().items()}
    for epoch in range(2, 5):  # the run that never stopped
        train_epoch(step, opt, sched, epoch)
    expected, expected_lr = states(student, loss), opt.param_groups[0]["lr"]

    # A new process: other initial weights, another RNG position, a fresh optimiser and schedule.
    student2, loss2, step2, opt2, sched2 = build(seed=123)
    torch.rand(1000)
    restored = read_state(tmp_path, rank=0, model=student2, loss=loss2, optimizer=opt2,
                          scheduler=sched2)
    assert restored.next_epoch == 2 and restored.history == history
    assert restored.scheduler_restored and restored.best is None
    assert all(torch.equal(saved_loss[k], v) for k, v in loss2.state_dict().items())
    for epoch in range(2, 5):
        train_epoch(step2, opt2, sched2, epoch)
    got = states(student2, loss2)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # bit for bit
    assert opt2.param_groups[0]["lr"] == expected_lr


def test_the_rng_state_is_what_makes_dropout_continue(tmp_path):
    """The control: the same restore without the RNG file diverges (dropout draws differ)."""
    student, loss, step, opt, sched = build(seed=0)
    train_epoch(step, opt, sched, 0)
    write_state(tmp_path, rank=0, model=student, loss=loss, optimizer=opt, scheduler=sched,
                spec=SPEC, info=INFO, epoch=0, metrics={}, phase_id=0, best=None, history=[])
    train_epoch(step, opt, sched, 1)
    expected = states(student)
    (tmp_path / rng_file(0)).unlink()
    student2, loss2, step2, opt2, sched2 = build(seed=0)
    torch.rand(1000)
    read_state(tmp_path, rank=0, model=student2, loss=loss2, optimizer=opt2, scheduler=sched2)
    train_epoch(step2, opt2, sched2, 1)
    assert not all(torch.equal(v, expected[k]) for k, v in states(student2).items())


def test_every_rank_writes_its_rng_and_rank0_the_rest(tmp_path):
    student, loss, step, opt, sched = build(seed=0)
    train_epoch(step, opt, sched, 0)
    best = {"epoch": 0, "val_accuracy": 0.9, "val_loss": 0.3,
            "state": {k: v.clone() for k, v in student.state_dict().items()}}
    write_state(tmp_path / "r1", rank=1, model=student, loss=loss, optimizer=opt,
                scheduler=sched, spec=SPEC, info=INFO, epoch=0, metrics={}, phase_id=0,
                best=best, history=[])
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == [rng_file(1)]
    write_state(tmp_path / "r0", rank=0, model=student, loss=loss, optimizer=opt,
                scheduler=sched, spec=SPEC, info=INFO, epoch=0, metrics={"_ended_at": 12.5},
                phase_id=0, best=best, history=[{"epoch": 0}])
    names = sorted(p.name for p in (tmp_path / "r0").iterdir())
    assert names == sorted(["model.safetensors", "loss.safetensors", "optimizer.pt",
                            "scheduler.pt", "best.safetensors", rng_file(0), "state.json"])
    state = json.loads((tmp_path / "r0" / "state.json").read_text())
    assert state["best"] == {"epoch": 0, "val_accuracy": 0.9, "val_loss": 0.3}
    restored = read_state(tmp_path / "r0", rank=1, model=student, loss=loss, optimizer=opt,
                          scheduler=sched)  # rank 1's file absent: rank 0's RNG state is used
    assert restored.last_ended_at == pytest.approx(12.5)
    assert all(torch.equal(restored.best["state"][k], v) for k, v in best["state"].items())
