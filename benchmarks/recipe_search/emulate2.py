"""Round-2 emulation of `raykd distill --baseline` (see emulate.py for the DDP emulation notes).

Changes from emulate.py:
* selection = the real code's rule (raykd/train/loop.py _better): best val accuracy, a tie goes
  to the LOWER val cross-entropy (strict lexicographic >, first epoch kept on an exact tie);
* datasets come from raykd.data.build_dataset with the overridden config (data.val_fraction);
* teacher may be trained on a subset of the training split (out-of-fold teachers);
* extras: teacher_ls (teacher CE label smoothing), lstd (Sun et al. CVPR 2024 logit
  standardisation: z-score both logit rows before /T in the KD term).
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from raykd.config import DistillConfig, LossTermConfig, load_config  # noqa: E402,F401
from raykd.data import build_dataset  # noqa: E402
from raykd.losses import DistillLoss  # noqa: E402
from raykd.models import build_model  # noqa: E402
from raykd.train.loop import RolePlan, _make_optimizer  # noqa: E402

HERE = Path(__file__).resolve().parent
TEACHERS = HERE / "teachers2"
_DS = {}


def ds(cfg, split):
    key = (cfg.data.model_dump_json(), split)
    if key not in _DS:
        _DS[key] = build_dataset(cfg.data, split)
    return _DS[key]


@torch.no_grad()
def evaluate(model, d):
    was = model.training
    model.eval()
    _, x, y = d.get_batch(torch.arange(len(d)))
    z = model(x)
    acc = float((z.argmax(-1) == y).float().mean())
    loss = float(F.cross_entropy(z.float(), y))
    model.train(was)
    return acc, loss


def zstd(z):
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)


def train_role(cfg, role, teacher_logits=None, extras=None, subset=None):
    extras = extras or {}
    plan = RolePlan.of(cfg, role)
    distill = plan.distill
    if role == "teacher" and extras.get("teacher_ls"):
        distill = DistillConfig(losses=[LossTermConfig(
            name="ce", params={"label_smoothing": float(extras["teacher_ls"])})])
    lstd = role == "student" and extras.get("lstd")
    world, seed = cfg.train.num_workers, cfg.train.seed
    torch.manual_seed(seed)
    train_ds, val_ds, test_ds = ds(cfg, "train"), ds(cfg, "val"), ds(cfg, "test")
    model = build_model(plan.model, train_ds.info,
                        field="teacher" if role == "teacher" else "student")
    loss = DistillLoss(distill, {}, {})
    optimizer = _make_optimizer(list(model.parameters()) + list(loss.parameters()), cfg, plan.lr)
    assert cfg.train.schedule == "constant" and not plan.jitter and cfg.teacher.mode == "cached"
    transfer = subset if subset is not None else torch.arange(len(train_ds))
    samplers = [torch.utils.data.DistributedSampler(range(len(transfer)), num_replicas=world,
                                                    rank=r, shuffle=True, seed=seed)
                for r in range(world)]
    bs = cfg.train.batch_size
    T, alpha = cfg.distill.temperature, cfg.distill.alpha
    best, hist = None, []
    model.train()
    for epoch in range(plan.epochs):
        rank_batches = []
        for s in samplers:
            s.set_epoch(epoch)
            rank_batches.append(transfer[torch.tensor(list(s), dtype=torch.long)].split(bs))
        for b in range(len(rank_batches[0])):
            xs, ys, ts = [], [], []
            for r in range(world):
                idx, x, y = train_ds.get_batch(rank_batches[r][b])
                xs.append(x)
                ys.append(y)
                if teacher_logits is not None:
                    ts.append(teacher_logits[idx, 0])
            y = torch.cat(ys)
            t = torch.cat(ts) if ts else None
            state = torch.get_rng_state()
            parts = []
            for r in range(world):
                torch.set_rng_state(state)
                parts.append(model(xs[r]))
            logits = torch.cat(parts)
            if lstd:
                s_, t_ = zstd(logits) / T, zstd(t.float()) / T
                kl = F.kl_div(F.log_softmax(s_, -1), F.log_softmax(t_, -1), log_target=True,
                              reduction="batchmean") * T * T
                total = (1 - alpha) * F.cross_entropy(logits, y) + alpha * kl
            else:
                total, _ = loss(logits, t, y, {}, {}, epoch=epoch, pretrain=False)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        va, vl = evaluate(model, val_ds)
        hist.append(va)
        if best is None or (va, -vl) > (best[0], -best[1]):
            best = (va, vl, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[3])
    model.eval()
    return model, {"val": evaluate(model, val_ds)[0], "test": evaluate(model, test_ds)[0],
                   "epoch": best[2], "val_curve": hist}


def folds_of(cfg, k):
    """Stratified K folds of the training split, seeded by train.seed: fold id per item."""
    y = ds(cfg, "train").get_batch(torch.arange(len(ds(cfg, "train"))))[2]
    g = torch.Generator().manual_seed(10_007 + cfg.train.seed)
    perm = torch.randperm(len(y), generator=g)
    fold = torch.empty(len(y), dtype=torch.long)
    for c in y.unique():
        members = perm[y[perm] == c]
        fold[members] = torch.arange(len(members)) % k
    return fold


def _key(cfg, extras, k, f):
    plan = RolePlan.of(cfg, "teacher")
    t = cfg.train
    blob = json.dumps([cfg.data.model_dump(mode="json"), plan.model.model_dump(mode="json"),
                       plan.epochs, plan.lr, t.seed, t.batch_size, t.num_workers, t.optimizer,
                       extras.get("teacher_ls", 0), "v2", k, f], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_logits(cfg, extras, k=0):
    """[N,1,C] cached logits (float16-rounded) + teacher record (mean over fold teachers).

    k=0: one teacher on the whole training split. k>=2: out-of-fold — teacher f is trained on
    the training split minus fold f, and gives the logits of fold f."""
    TEACHERS.mkdir(exist_ok=True)
    train_ds = ds(cfg, "train")
    _, x, _ = train_ds.get_batch(torch.arange(len(train_ds)))
    fold = folds_of(cfg, k) if k else torch.zeros(len(train_ds), dtype=torch.long)
    out = torch.empty(len(train_ds), train_ds.info.num_classes)
    recs = []
    for f in range(max(k, 1)):
        path = TEACHERS / f"{_key(cfg, extras, k, f)}.pt"
        model = build_model(cfg.teacher, train_ds.info, field="teacher")
        if path.exists():
            blob = torch.load(path, weights_only=False)
            model.load_state_dict(blob["state"])
            rec = blob["rec"]
        else:
            subset = torch.nonzero(fold != f).flatten() if k else None
            model, rec = train_role(cfg, "teacher", extras=extras, subset=subset)
            torch.save({"state": model.state_dict(), "rec": rec}, path)
        model.eval()
        with torch.no_grad():
            z = model(x)
        sel = fold == f
        out[sel] = z[sel]
        recs.append(rec)
    logits = out.to(getattr(torch, cfg.teacher.cache_dtype)).float().unsqueeze(1)
    rec = {"val": sum(r["val"] for r in recs) / len(recs),
           "test": sum(r["test"] for r in recs) / len(recs),
           "epoch": [r["epoch"] for r in recs]}
    return logits, rec
