"""Round 3: function matching (Beyer et al. 2022, arXiv 2106.05237) on the digits default.

python mix3.py [--seeds 0,1,2,3,4] VF:TEACHER ...   → r3/grid.jsonl (other seeds → r3/confirm.jsonl)

Per (vf, teacher, seed) it trains, all with the same student ([32], Adam lr 0.01, batch 64 × 2
emulated DDP ranks, best-on-val selection as emulate2):
  base            plain hard-label baseline (today's `--baseline`), epochs E
  bmix a          hard-label mixup baseline: mixed inputs, mixed one-hot CE (Zhang et al.)
  bmixc a V       same, but with the V cached views (view e mod V at epoch e)
  kd   T alpha    plain Hinton KD on clean inputs (today's distill)
  fm   a T alpha  live function matching: teacher (eval) labels the exact mixed view
  fmc  a T alpha V cached function matching: V seeded mixup views per training sample, teacher
                  logits cached per view; epoch e uses view e mod V
Mixup: per-sample λ ~ Beta(a, a); live: partner = seeded random permutation within the rank's
batch; cached: partner of sample i in view v = perm_v[i] over the training split (seeded by
train.seed and v). KD term: T²·KL(softmax(t/T) ‖ softmax(s/T)); hard term (1−alpha)·mixed CE.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emulate2 as e  # noqa: E402
from grid2 import TEACHERS  # noqa: E402

torch.set_num_threads(1)
OUT = Path(__file__).resolve().parent / "r3"


def teacher_model(cfg, ex):
    e.teacher_logits(cfg, ex, 0)  # make sure it is cached
    path = e.TEACHERS / f"{e._key(cfg, ex, 0, 0)}.pt"
    blob = torch.load(path, weights_only=False)
    tr = e.ds(cfg, "train")
    m = e.build_model(cfg.teacher, tr.info, field="teacher")
    m.load_state_dict(blob["state"])
    m.eval()
    return m, blob["rec"]


def beta(a, n, g):
    d = torch.distributions.Beta(torch.tensor(float(a)), torch.tensor(float(a)))
    # sample via gammas with our generator for reproducibility
    x = torch._standard_gamma(torch.full((n,), float(a)), generator=g)
    y = torch._standard_gamma(torch.full((n,), float(a)), generator=g)
    del d
    return x / (x + y)


def cached_views(cfg, a, V, n):
    """perm [V,N], lam [V,N] for the cached variant."""
    g = torch.Generator().manual_seed(20_011 + 7919 * cfg.train.seed)
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(V)])
    lams = torch.stack([beta(a, n, g) for _ in range(V)])
    return perms, lams


def train_student(cfg, mode, teacher=None, a=0.0, T=4.0, alpha=0.9, V=0, cache=None):
    """mode in base, bmix, bmixc, kd, fm, fmc. Returns record like emulate2.train_role."""
    plan = e.RolePlan.of(cfg, "student")
    world, seed = cfg.train.num_workers, cfg.train.seed
    torch.manual_seed(seed)
    train_ds, val_ds, test_ds = e.ds(cfg, "train"), e.ds(cfg, "val"), e.ds(cfg, "test")
    model = e.build_model(plan.model, train_ds.info, field="student")
    opt = e._make_optimizer(list(model.parameters()), cfg, plan.lr)
    n = len(train_ds)
    _, X, Y = train_ds.get_batch(torch.arange(n))
    C = train_ds.info.num_classes
    Yh = F.one_hot(Y, C).float()
    if mode in ("kd",):
        with torch.no_grad():
            tclean = teacher(X).to(torch.float16).float()
    samplers = [torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=r,
                                                    shuffle=True, seed=seed) for r in range(world)]
    g = torch.Generator().manual_seed(30_011 + 104_729 * seed)
    bs = cfg.train.batch_size
    best, hist = None, []
    model.train()
    for epoch in range(plan.epochs):
        rb = []
        for s in samplers:
            s.set_epoch(epoch)
            rb.append(torch.tensor(list(s), dtype=torch.long).split(bs))
        for b in range(len(rb[0])):
            xs, qs, ts = [], [], []  # inputs, soft/mixed hard targets, teacher logits
            for r in range(world):
                idx = rb[r][b]
                x, q = X[idx], Yh[idx]
                if mode in ("bmix", "fm"):
                    lam = beta(a, len(idx), g)
                    p = torch.randperm(len(idx), generator=g)
                    lx = lam.view(-1, *[1] * (x.dim() - 1))
                    x = lx * x + (1 - lx) * x[p]
                    q = lam[:, None] * q + (1 - lam[:, None]) * q[p]
                elif mode in ("bmixc", "fmc"):
                    v = epoch % V
                    perms, lams = cache["perms"], cache["lams"]
                    j = perms[v, idx]
                    lam = lams[v, idx]
                    lx = lam.view(-1, *[1] * (x.dim() - 1))
                    x = lx * x + (1 - lx) * X[j]
                    q = lam[:, None] * q + (1 - lam[:, None]) * Yh[j]
                xs.append(x)
                qs.append(q)
                if mode == "fm":
                    with torch.no_grad():
                        ts.append(teacher(x).to(torch.float16).float())
                elif mode == "fmc":
                    ts.append(cache["tl"][epoch % V, idx])
                elif mode == "kd":
                    ts.append(tclean[idx])
            logits = torch.cat([model(x) for x in xs])
            q = torch.cat(qs)
            ce = -(q * F.log_softmax(logits, -1)).sum(-1).mean()
            if ts:
                t = torch.cat(ts)
                kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t / T, -1),
                              log_target=True, reduction="batchmean") * T * T
                total = (1 - alpha) * ce + alpha * kl if alpha < 1 else kl
            else:
                total = ce
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        va, vl = e.evaluate(model, val_ds)
        hist.append(va)
        if best is None or (va, -vl) > (best[0], -best[1]):
            best = (va, vl, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[3])
    model.eval()
    return {"val": e.evaluate(model, val_ds)[0], "test": e.evaluate(model, test_ds)[0],
            "epoch": best[2]}


def build_cache(cfg, teacher, a, V):
    tr = e.ds(cfg, "train")
    n = len(tr)
    _, X, _ = tr.get_batch(torch.arange(n))
    perms, lams = cached_views(cfg, a, V, n)
    with torch.no_grad():
        sh = (-1, *[1] * (X.dim() - 1))
        tl = torch.stack([teacher(lams[v].view(sh) * X + (1 - lams[v].view(sh)) * X[perms[v]])
                          for v in range(V)]).to(torch.float16).float()
    return {"perms": perms, "lams": lams, "tl": tl}


def runs(epochs, As, Ts, alphas, Vs, live=True):
    """List of (mode, a, T, alpha, V, E)."""
    out = []
    for E in epochs:
        out.append(("base", 0, 0, 0, 0, E))
        out.append(("kd", 0, 4.0, 0.9, 0, E))
        for a in As:
            if live:
                out.append(("bmix", a, 0, 0, 0, E))
                for T in Ts:
                    for al in alphas:
                        out.append(("fm", a, T, al, 0, E))
            for V in Vs:
                out.append(("bmixc", a, 0, 0, V, E))
                for T in Ts:
                    for al in alphas:
                        out.append(("fmc", a, T, al, V, E))
    return out


PLANS = {
    "live": dict(epochs=(20, 40, 60), As=(0.2, 1.0), Ts=(1.0, 2.0, 4.0), alphas=(1.0, 0.9),
                 Vs=(), live=True),
    "cache": dict(epochs=(20, 40, 60), As=(0.2, 1.0), Ts=(1.0, 2.0, 4.0), alphas=(1.0, 0.9),
                  Vs=(4, 8), live=False),
    "long_live": dict(epochs=(100,), As=(0.2, 1.0), Ts=(1.0,), alphas=(1.0, 0.9), Vs=(),
                      live=True),
    "long_cache": dict(epochs=(100,), As=(0.2, 1.0), Ts=(1.0,), alphas=(1.0, 0.9), Vs=(8,),
                       live=False),
}


def main(seeds, plan, specs, out, filt=None):
    for spec in specs:
        vf, name = spec.split(":")
        over, ex, k = TEACHERS[name]
        assert k == 0
        for seed in seeds:
            t0 = time.perf_counter()
            base_over = {**over, "data.val_fraction": float(vf), "train.seed": seed}
            cfg0 = e.load_config(None, base_over)
            teacher, trec = teacher_model(cfg0, ex)
            caches = {}
            for mode, a, T, al, V, E in runs(**PLANS[plan]):
                if filt and not filt(mode, a, T, al, V, E):
                    continue
                cfg = e.load_config(None, {**base_over, "train.epochs": E})
                cache = None
                if mode in ("bmixc", "fmc"):
                    if (a, V) not in caches:
                        caches[(a, V)] = build_cache(cfg0, teacher, a, V)
                    cache = caches[(a, V)]
                rec = train_student(cfg, mode, teacher, a, T, al, V, cache)
                row = {"vf": float(vf), "teacher": name, "seed": seed, "mode": mode, "a": a,
                       "T": T, "alpha": al, "V": V, "epochs": E, "t_val": trec["val"],
                       "t_test": trec["test"], "s_val": rec["val"], "s_test": rec["test"],
                       "s_epoch": rec["epoch"]}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(spec, seed, plan, "%.1fs" % (time.perf_counter() - t0), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    seeds, plan, filt = list(range(5)), "live", None
    while args and args[0].startswith("--"):
        if args[0] == "--seeds":
            seeds = [int(x) for x in args[1].split(",")]
        elif args[0] == "--plan":
            plan = args[1]
        elif args[0] == "--filt":
            filt = eval("lambda mode, a, T, al, V, E: " + args[1])
        args = args[2:]
    OUT.mkdir(exist_ok=True)
    out = OUT / ("grid.jsonl" if seeds == list(range(5)) else "confirm.jsonl")
    main(seeds, plan, args, out, filt)
