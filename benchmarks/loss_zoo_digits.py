"""Measure every loss family, alone and combined, on digits (CNN teacher → small CNN student).

    .venv/bin/python benchmarks/loss_zoo_digits.py --json benchmarks/results/loss_zoo_digits.json

A benchmark, not a test: it trains in ONE process with raykd's own data registry, models,
forward hooks and DistillLoss (the code the Ray Train loop runs per worker), so the numbers compare
the losses without Ray start-up noise. Each configuration: mean and spread of test accuracy over
seeds, same epochs and optimiser for all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from raykd.config import DistillConfig, load_config
from raykd.data import build_dataset
from raykd.losses import DistillLoss
from raykd.models import build_model
from raykd.models.hooks import FeatureHooks, probe_shapes

TEACHER = {"name": "cnn", "args": {"channels": [64, 128], "hidden": 256}}
STUDENT = {"name": "cnn", "args": {"channels": [8, 16], "hidden": 32}}
HINTON = [{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5}]


def pair(key, s, t, weight=1.0, **params):
    return {"name": key, "weight": weight, "student_layers": s, "teacher_layers": t,
            "params": params}


CONFIGS: dict[str, list[dict]] = {
    "ce only (baseline)": [{"name": "ce"}],
    "kd": HINTON,
    "dkd": [{"name": "ce"}, {"name": "dkd", "params": {"alpha": 1.0, "beta": 2.0}}],
    "kd + fitnets": HINTON + [pair("fitnets", ["features.1"], ["features.1"])],
    "kd + at": HINTON + [pair("at", ["features.0", "features.1"], ["features.0", "features.1"])],
    "kd + nst": HINTON + [pair("nst", ["features.1"], ["features.1"])],
    "kd + ft": HINTON + [pair("ft", ["features.1"], ["features.1"], pretrain_epochs=2)],
    "kd + ab": HINTON + [pair("ab", ["features.1.bn"], ["features.1.bn"])],
    "kd + rkd": HINTON + [pair("rkd", ["hidden"], ["hidden"])],
    "kd + sp": HINTON + [pair("sp", ["features.1"], ["features.1"], weight=100.0)],
    # FSP matrices are C1×C2 per side, so FSP needs teacher and student stages of equal widths
    # (Yim et al. distil a ResNet into a shallower one of the same widths); not this pair.
    "kd + pkt": HINTON + [pair("pkt", ["hidden"], ["hidden"])],
    "kd + fitnets + rkd + at": HINTON + [
        pair("fitnets", ["features.1"], ["features.1"]), pair("rkd", ["hidden"], ["hidden"]),
        pair("at", ["features.0", "features.1"], ["features.0", "features.1"])],
}


def accuracy(model, ds) -> float:
    model.eval()
    _, x, y = ds.get_batch(torch.arange(len(ds)))
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(cfg, model_spec, terms, epochs, lr, seed, teacher=None, t_paths=()):
    torch.manual_seed(seed)
    train_ds = build_dataset(cfg.data, "train")
    model = build_model(type(cfg.student)(**model_spec), train_ds.info)
    distill = DistillConfig(temperature=cfg.distill.temperature, losses=terms)
    s_paths = sorted({p for t in distill.terms() for p in t.student_layers})
    _, example, _ = train_ds.get_batch(torch.arange(2))
    s_shapes = probe_shapes(model, s_paths, example, "student") if s_paths else {}
    t_shapes = probe_shapes(teacher, list(t_paths), example, "teacher") if t_paths else {}
    loss = DistillLoss(distill, s_shapes, t_shapes)
    opt = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with FeatureHooks(model, s_paths, "student") as s_hooks, \
            FeatureHooks(teacher, list(t_paths), "teacher") if teacher else _null() as t_hooks:
        for epoch in range(epochs):
            model.train()
            for idx in torch.randperm(len(train_ds), generator=gen).split(64):
                _, x, y = train_ds.get_batch(idx)
                t_logits, t_feats = None, {}
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
                        t_feats = dict(t_hooks.features) if t_paths else {}
                logits = model(x)
                total, _ = loss(logits, t_logits, y, dict(s_hooks.features), t_feats,
                                epoch=epoch, pretrain=epoch < loss.pretrain_epochs)
                opt.zero_grad()
                total.backward()
                opt.step()
    return model


class _null:
    features: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.003)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(None, ["distill.temperature=4"])
    test_ds = build_dataset(cfg.data, "test")
    start = time.perf_counter()
    teacher = train(cfg, TEACHER, [{"name": "ce"}], 20, args.lr, 0).eval()
    results = {"teacher_accuracy": accuracy(teacher, test_ds), "epochs": args.epochs,
               "seeds": args.seeds, "temperature": 4.0, "teacher": TEACHER, "student": STUDENT,
               "configs": {}}
    print(f"teacher {results['teacher_accuracy']:.4f}", flush=True)
    for name, terms in CONFIGS.items():
        t_paths = sorted({p for t in terms for p in t.get("teacher_layers", [])})
        needs_teacher = any(t["name"] != "ce" for t in terms)
        accs = [accuracy(train(cfg, STUDENT, terms, args.epochs, args.lr, seed,
                               teacher if needs_teacher else None, t_paths), test_ds)
                for seed in range(args.seeds)]
        results["configs"][name] = {"mean": statistics.mean(accs),
                                    "spread": max(accs) - min(accs), "runs": accs}
        print(f"{name:<28} {statistics.mean(accs):.4f} ± {max(accs) - min(accs):.4f}",
              flush=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
