"""The per-worker training loop, one function for teacher, student and baseline runs.

Each Ray Train worker builds its own data and model from the validated config (nothing large
travels in the config), takes its DistributedSampler share of the transfer set, and per step looks
up the teacher's cached logits for the batch's sample indices locally. Rank 0 logs to MLflow,
prints one line per epoch and writes the checkpoint.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raykd.config import DistillConfig, LossTermConfig, ModelConfig, RaykdConfig, validate


@dataclass(frozen=True)
class RolePlan:
    """What differs between training the teacher, the student and the baseline."""

    role: str
    model: ModelConfig
    distill: DistillConfig
    epochs: int
    lr: float
    jitter: int

    @staticmethod
    def of(cfg: RaykdConfig, role: str) -> RolePlan:
        hard_labels = DistillConfig(losses=[LossTermConfig(name="ce")])
        if role == "teacher":
            return RolePlan(role, cfg.teacher, hard_labels, cfg.teacher.epochs or cfg.train.epochs,
                            cfg.teacher.lr or cfg.train.lr, cfg.teacher.jitter)
        distill = cfg.distill if role == "student" else hard_labels
        return RolePlan(role, cfg.student, distill, cfg.train.epochs, cfg.train.lr,
                        cfg.train.jitter)


class DistillStep(nn.Module):
    """Student forward (features taken by hooks) + loss in one module, so DDP sees every learned
    parameter — the student's and the loss terms' regressors — inside its forward."""

    def __init__(self, student: nn.Module, loss: nn.Module, paths: list[str]):
        super().__init__()
        from raykd.models.hooks import FeatureHooks

        self.student, self.loss = student, loss
        self._hooks = FeatureHooks(student, paths, "student").__enter__() if paths else None

    def forward(self, x, t_logits, y, t_feats, epoch: int, pretrain: bool):
        logits = self.student(x)
        s_feats = dict(self._hooks.features) if self._hooks else {}
        total, parts = self.loss(logits, t_logits, y, s_feats, t_feats, epoch=epoch,
                                 pretrain=pretrain)
        return total, parts


def _all_reduce_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device, rank: int = 0, world: int = 1,
             batch_size: int = 1024) -> float:
    """Accuracy over ``dataset``, each rank scoring its strided share."""
    was_training = model.training
    model.eval()
    correct = total = 0
    idx_all = torch.arange(rank, len(dataset), world)
    for chunk in idx_all.split(batch_size):
        _, x, y = dataset.get_batch(chunk)
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    correct, total = _all_reduce_sum([correct, total], world)
    return correct / max(total, 1)


def _make_optimizer(params, cfg: RaykdConfig, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=t.weight_decay)


def _feature_paths(distill: DistillConfig, side: str) -> list[str]:
    paths: list[str] = []
    for term in distill.terms():
        for p in getattr(term, f"{side}_layers"):
            if p not in paths:
                paths.append(p)
    return paths


def _restore(model, optimizer, resume_from=None) -> int:
    """Resume from Ray Train's latest checkpoint after a worker failure (else from
    ``resume_from``, a checkpoint handed in by a Tune trial); returns the next epoch."""
    import ray.train

    ckpt = ray.train.get_checkpoint() or resume_from
    if ckpt is None:
        return 0
    from safetensors.torch import load_file

    with ckpt.as_directory() as d:
        model.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
        optimizer.load_state_dict(torch.load(Path(d) / "optimizer.pt", weights_only=True))
        return json.loads((Path(d) / "state.json").read_text())["epoch"] + 1


def _save(model, optimizer, spec: dict, info, epoch: int, metrics: dict):
    import ray.train

    from raykd.train.checkpoint import save_checkpoint

    tmp = tempfile.mkdtemp(prefix="raykd-ckpt-")
    save_checkpoint(model, spec, info, tmp)
    torch.save(optimizer.state_dict(), Path(tmp) / "optimizer.pt")
    (Path(tmp) / "state.json").write_text(json.dumps({"epoch": epoch, "metrics": metrics}))
    return ray.train.Checkpoint.from_directory(tmp)


def train_loop_per_worker(loop: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    from raykd import tracking
    from raykd.data import build_dataset
    from raykd.data.augment import augment
    from raykd.losses import DistillLoss
    from raykd.models import build_model, count_params
    from raykd.models.hooks import probe_shapes
    from raykd.teacher.client import (CachedTeacher, OnlineTeacher, replay_inputs, replay_view,
                                      shard_local_order)

    cfg, role = validate(loop["config"]), loop["role"]
    plan = RolePlan.of(cfg, role)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    info = train_ds.info
    field = "teacher" if role == "teacher" else "student"
    model = build_model(plan.model, info, field=field)
    copied: list[str] = []
    if loop.get("init_from") and role == "student":
        from raykd.models.init import init_student_from_teacher
        from raykd.teacher.loading import local_checkpoint
        from raykd.train.checkpoint import load_model

        teacher_src = local_checkpoint(loop["init_from"], loop.get("tracking_uri") or "")
        copied = init_student_from_teacher(model, load_model(teacher_src, cfg.teacher, info))
    model.to(device)

    handoff = loop.get("teacher") if role == "student" else None
    s_paths = _feature_paths(plan.distill, "student")
    _, example, _ = train_ds.get_batch(torch.arange(min(2, len(train_ds))))
    s_shapes = probe_shapes(model, s_paths, example.to(device), "student") if s_paths else {}
    t_shapes = {p: torch.Size(s) for p, s in (handoff.feature_shapes if handoff else {}).items()}
    loss = DistillLoss(plan.distill, s_shapes, t_shapes).to(device)
    step = ray.train.torch.prepare_model(
        DistillStep(model, loss, s_paths),
        parallel_strategy_kwargs={"find_unused_parameters": loss.pretrain_epochs > 0})
    optimizer = _make_optimizer(list(step.parameters()), cfg, plan.lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, plan.epochs)
                 if cfg.train.schedule == "cosine" else None)
    start_epoch = _restore(model, optimizer, loop.get("resume_from"))

    cached = online = None
    if handoff is not None and handoff.mode == "online":
        online = OnlineTeacher(handoff, _feature_paths(plan.distill, "teacher"))
    elif handoff is not None:
        cached = CachedTeacher(handoff)
    replay = handoff is not None and handoff.mode == "replay"
    views = handoff.spec.views if replay else 1

    transfer = (train_ds.subset_indices(cfg.distill.include_classes, cfg.distill.exclude_classes)
                if role == "student" else torch.arange(len(train_ds)))
    sampler = torch.utils.data.DistributedSampler(range(len(transfer)), num_replicas=world,
                                                  rank=rank, shuffle=True, seed=cfg.train.seed)
    uri, run_id = loop.get("tracking_uri"), loop.get("run_id")
    history: list[dict[str, float]] = []
    spec = {"name": plan.model.name, "args": plan.model.args}
    bs = cfg.train.batch_size
    for epoch in range(start_epoch, plan.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        order = transfer[torch.tensor(list(sampler), dtype=torch.long)]
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch)
        if cached is not None:
            order = shard_local_order(order, cached, gen)
        batches = order.split(bs)
        pretrain = epoch < loss.pretrain_epochs
        sums = {"loss": 0.0, "n": 0.0}
        step.train()
        for b, idx in enumerate(batches):
            idx, x, y = train_ds.get_batch(idx)
            view: torch.Tensor | int = 0
            if replay:  # the cached view whose labels this sample gets this epoch, rendered
                view = replay_view(idx, epoch, views, cfg.train.seed)
                x = replay_inputs(x, idx, view, cfg.train.seed, cfg.train.jitter, cfg.train.flip)
            elif plan.jitter or (role != "teacher" and cfg.train.flip):
                seeds = torch.randint(0, 2**62, (len(idx),), generator=gen)
                x = augment(x, seeds, plan.jitter, cfg.train.flip and role != "teacher")
            t_logits, t_feats = None, {}
            if cached is not None:
                t_logits = cached.logits(idx, view)
                if b + 1 < len(batches):
                    cached.prefetch(batches[b + 1])
            elif online is not None:
                t_logits, t_feats = online.forward(x)
            x, y = x.to(device), y.to(device)
            t_logits = t_logits.to(device) if t_logits is not None else None
            t_feats = {k: v.to(device) for k, v in t_feats.items()}
            total, parts = step(x, t_logits, y, t_feats, epoch, pretrain)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            n = float(len(idx))
            sums["loss"] += float(total.detach()) * n
            sums["n"] += n
            for k, v in parts.items():
                sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + float(v) * n
        if scheduler:
            scheduler.step()
        keys = sorted(sums)
        reduced = dict(zip(keys, _all_reduce_sum([sums[k] for k in keys], world), strict=True))
        seconds = time.perf_counter() - t0
        metrics = {("train_loss" if k == "loss" else k): v / max(reduced["n"], 1)
                   for k, v in reduced.items() if k != "n"}
        metrics.update(val_accuracy=evaluate(model, val_ds, device, rank, world),
                       epoch=epoch, epoch_seconds=seconds,
                       samples_per_s=reduced["n"] / max(seconds, 1e-9), pretrain=float(pretrain))
        history.append(metrics)
        checkpoint = None
        if rank == 0:
            # Not print(): Ray Train patches it to log *and* tee, which doubles every line.
            sys.stdout.write(f"[{loop.get('name', role)}] epoch {epoch + 1}/{plan.epochs} "
                             f"loss {metrics['train_loss']:.4f} "
                             f"val_acc {metrics['val_accuracy']:.4f} "
                             f"({metrics['samples_per_s']:.0f} samples/s)\n")
            sys.stdout.flush()
            if uri and run_id:
                tracking.log_metrics(uri, run_id, metrics, step=epoch)
            last = epoch + 1 == plan.epochs
            if last or (epoch + 1) % cfg.train.checkpoint_every == 0:
                checkpoint = _save(model, optimizer, spec, info, epoch, metrics)
        ray.train.report(metrics, checkpoint=checkpoint)
    if cached is not None:
        cached.close()
    return {"history": history, "params": count_params(model), "role": role,
            "transfer_size": len(transfer), "init_copied": copied}
