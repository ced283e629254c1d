"""Plain-PyTorch emulation of `raykd distill --baseline` (teacher → cache → student, baseline).

Mirrors raykd/train/loop.py's train_loop_per_worker for each role, with the 2 data-parallel
workers emulated in ONE process: at step b the batches rank 0 and rank 1 would take (each 64, from
DistributedSampler(shuffle=True, seed=train.seed), same per-rank augmentation generator) are
concatenated into one batch of 128 and the loss is the mean over it, which equals DDP's average
of the two ranks' mean losses because both ranks' batches have the same size at every step
(1294 train items → 647 per rank → 10×64 + 7). Dropout: every rank seeds torch identically
(torch.manual_seed(train.seed) before building the model) and so draws the same masks at each
step; the emulation replays the global RNG state for each rank's half of the batch. Remaining
differences: float summation order (DDP's all-reduce), nothing else known.

Model selection: 'best' keeps the state of the epoch with the highest val accuracy (first such
epoch, strict >), for teacher, student and baseline alike — what the new code will do; 'last'
keeps the final epoch (what the code does today).

Extras (knobs raykd does not have): teacher_ls = label smoothing of the teacher's CE.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from raykd.config import DistillConfig, LossTermConfig, load_config  # noqa: E402
from raykd.data import build_dataset  # noqa: E402
from raykd.data.augment import augment  # noqa: E402
from raykd.losses import DistillLoss  # noqa: E402
from raykd.models import build_model  # noqa: E402
from raykd.teacher.client import replay_inputs, replay_view  # noqa: E402
from raykd.train.loop import RolePlan, _make_optimizer  # noqa: E402

HERE = Path(__file__).resolve().parent
TEACHERS = HERE / "teachers"


@torch.no_grad()
def accuracy(model, ds) -> float:
    was = model.training
    model.eval()
    _, x, y = ds.get_batch(torch.arange(len(ds)))
    acc = float((model(x).argmax(-1) == y).float().mean())
    model.train(was)
    return acc


def train_role(cfg, role, teacher_logits=None, extras=None):
    """One fit of `role`; returns (selected model, record)."""
    extras = extras or {}
    plan = RolePlan.of(cfg, role)
    distill = plan.distill
    if role == "teacher" and extras.get("teacher_ls"):
        distill = DistillConfig(losses=[LossTermConfig(
            name="ce", params={"label_smoothing": float(extras["teacher_ls"])})])
    world, seed = cfg.train.num_workers, cfg.train.seed
    torch.manual_seed(seed)
    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    test_ds = build_dataset(cfg.data, "test")
    info = train_ds.info
    model = build_model(plan.model, info, field="teacher" if role == "teacher" else "student")
    loss = DistillLoss(distill, {}, {})
    params = list(model.parameters()) + list(loss.parameters())
    optimizer = _make_optimizer(params, cfg, plan.lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, plan.epochs)
                 if cfg.train.schedule == "cosine" else None)
    replay = role == "student" and cfg.teacher.mode == "replay"
    views = cfg.teacher.views if replay else 1
    transfer = (train_ds.subset_indices(cfg.distill.include_classes, cfg.distill.exclude_classes)
                if role == "student" else torch.arange(len(train_ds)))
    samplers = [torch.utils.data.DistributedSampler(range(len(transfer)), num_replicas=world,
                                                    rank=r, shuffle=True, seed=seed)
                for r in range(world)]
    bs = cfg.train.batch_size
    select = extras.get("select", "best")
    best_acc, best_state, best_epoch, hist = -1.0, None, -1, []
    model.train()
    for epoch in range(plan.epochs):
        rank_batches, gens = [], []
        for s in samplers:
            s.set_epoch(epoch)
            order = transfer[torch.tensor(list(s), dtype=torch.long)]
            rank_batches.append(order.split(bs))
            gens.append(torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for b in range(len(rank_batches[0])):
            xs, ys, ts = [], [], []
            for r in range(world):
                idx, x, y = train_ds.get_batch(rank_batches[r][b])
                view = 0
                if replay:
                    view = replay_view(idx, epoch, views, seed)
                    x = replay_inputs(x, idx, view, seed, cfg.train.jitter, cfg.train.flip)
                elif plan.jitter or (role != "teacher" and cfg.train.flip):
                    seeds = torch.randint(0, 2**62, (len(idx),), generator=gens[r])
                    x = augment(x, seeds, plan.jitter, cfg.train.flip and role != "teacher")
                xs.append(x)
                ys.append(y)
                if teacher_logits is not None:
                    ts.append(teacher_logits[idx, view])
            x, y = torch.cat(xs), torch.cat(ys)
            t = torch.cat(ts) if ts else None
            # Every rank seeded torch identically, so each draws the same dropout masks: replay
            # the global RNG state for each rank's half of the step.
            state = torch.get_rng_state()
            parts = []
            for r in range(world):
                torch.set_rng_state(state)
                parts.append(model(xs[r]))
            logits = torch.cat(parts)
            total, _ = loss(logits, t, y, {}, {}, epoch=epoch, pretrain=False)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        if scheduler:
            scheduler.step()
        va = accuracy(model, val_ds)
        hist.append(va)
        if va > best_acc:
            best_acc, best_epoch = va, epoch
            best_state = copy.deepcopy(model.state_dict())
    last = {"val": hist[-1], "test": accuracy(model, test_ds)}
    if select == "best":
        model.load_state_dict(best_state)
    model.eval()
    rec = {"val": accuracy(model, val_ds), "test": accuracy(model, test_ds),
           "epoch": best_epoch if select == "best" else plan.epochs - 1,
           "last_val": last["val"], "last_test": last["test"], "val_curve": hist}
    return model, rec


def teacher_key(cfg, extras) -> str:
    plan = RolePlan.of(cfg, "teacher")
    t = cfg.train
    blob = json.dumps([cfg.data.model_dump(mode="json"), plan.model.model_dump(mode="json"),
                       plan.epochs, plan.lr, plan.jitter, t.seed, t.batch_size, t.num_workers,
                       t.optimizer, t.weight_decay, t.momentum, t.schedule,
                       extras.get("teacher_ls", 0), extras.get("select", "best")],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_teacher(cfg, extras):
    TEACHERS.mkdir(exist_ok=True)
    key = teacher_key(cfg, extras)
    path = TEACHERS / f"{key}.pt"
    info = build_dataset(cfg.data, "train").info
    if path.exists():
        blob = torch.load(path, weights_only=False)
        model = build_model(cfg.teacher, info, field="teacher")
        model.load_state_dict(blob["state"])
        model.eval()
        return model, blob["rec"], True
    model, rec = train_role(cfg, "teacher", extras=extras)
    torch.save({"state": model.state_dict(), "rec": rec}, path)
    return model, rec, False


@torch.no_grad()
def teacher_cache(cfg, teacher) -> torch.Tensor:
    """[N, V, C] logits as the actor's _produce builds them (eval mode; float16 cache)."""
    train_ds = build_dataset(cfg.data, "train")
    idx, x, _ = train_ds.get_batch(torch.arange(len(train_ds)))
    teacher.eval()
    if cfg.teacher.mode == "replay":
        t = cfg.train
        out = [teacher(replay_inputs(x, idx, v, t.seed, t.jitter, t.flip))
               for v in range(cfg.teacher.views)]
    else:
        out = [teacher(x)]
    logits = torch.stack(out, 1).float()
    return logits.to(getattr(torch, cfg.teacher.cache_dtype)).float()


def run_seed(overrides: dict, extras: dict, seed: int) -> dict:
    cfg = load_config(None, {**overrides, "train.seed": seed})
    t0 = time.perf_counter()
    teacher, trec, reused = get_teacher(cfg, extras)
    cache = teacher_cache(cfg, teacher)
    _, srec = train_role(cfg, "student", teacher_logits=cache, extras=extras)
    _, brec = train_role(cfg, "baseline", extras=extras)
    plan_t = RolePlan.of(cfg, "teacher")
    return {"seed": seed, "teacher": trec, "student": srec, "baseline": brec,
            "teacher_reused": reused, "seconds": round(time.perf_counter() - t0, 2),
            "epochs_total": plan_t.epochs + 2 * cfg.train.epochs}
