"""Round-2 screen: python grid2.py [--seeds 0,1,2,3,4] [--sset A] VF:TEACHER [VF:TEACHER ...]
One line per (val_fraction, teacher variant, student setting, seed) → r2/grid.jsonl
(seeds other than 0-4 → r2/confirm.jsonl). Ranking uses val only (agg2.py)."""
import json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import emulate2 as e

# name → (teacher overrides, extras, K folds: 0 = one teacher on the full training split)
TEACHERS = {}
for tag, over, ex in (("def", {}, {}), ("lr1e-3", {"teacher.lr": 0.001}, {}),
                      ("ls0.1", {}, {"teacher_ls": 0.1}),
                      ("lr1e-3_ls0.1", {"teacher.lr": 0.001}, {"teacher_ls": 0.1}),
                      ("ep15", {"teacher.epochs": 15}, {}),
                      ("lr1e-3_ep15", {"teacher.lr": 0.001, "teacher.epochs": 15}, {}),
                      ("ep20", {"teacher.epochs": 20}, {})):
    TEACHERS[f"full_{tag}"] = (over, ex, 0)
    for k in (2, 3, 5):
        TEACHERS[f"oof{k}_{tag}"] = (over, ex, k)

SSETS = {
    "A": [dict(width=w, T=T, alpha=a, epochs=20, lstd=False)
          for w in (16, 32) for T in (2, 4, 8) for a in (0.5, 0.9)],
    "L": [dict(width=w, T=T, alpha=a, epochs=20, lstd=True)
          for w in (16, 32) for T in (1, 2, 4) for a in (0.5, 0.9)],
    "E": [dict(width=w, T=T, alpha=a, epochs=e, lstd=False)
          for e in (30, 40) for w in (16, 32) for T in (2, 4) for a in (0.5, 0.9)],
    "L2": [dict(width=w, T=T, alpha=a, epochs=30, lstd=True)
           for w in (8, 16, 32) for T in (1, 2, 4) for a in (0.5, 0.9)],
    "W8": [dict(width=8, T=T, alpha=a, epochs=e, lstd=False)
           for e in (30, 40) for T in (2, 4, 8) for a in (0.5, 0.9)],
}
_base = {}

def student_over(s):
    return {"student.args": {"hidden_sizes": [s["width"]]}, "distill.temperature": s["T"],
            "distill.alpha": s["alpha"], "train.epochs": s["epochs"]}

def main(seeds, sset, specs, out):
    for spec in specs:
        vf, name = spec.split(":")
        over, ex, k = TEACHERS[name]
        for seed in seeds:
            t0 = time.perf_counter()
            base_over = {**over, "data.val_fraction": float(vf), "train.seed": seed}
            cfg = e.load_config(None, base_over)
            logits, trec = e.teacher_logits(cfg, ex, k)
            t1 = time.perf_counter() - t0
            for s in SSETS[sset]:
                cfg = e.load_config(None, {**base_over, **student_over(s)})
                _, srec = e.train_role(cfg, "student", teacher_logits=logits,
                                       extras={**ex, "lstd": s["lstd"]})
                bkey = (vf, s["width"], s["epochs"], seed)
                if bkey not in _base:
                    _base[bkey] = e.train_role(cfg, "baseline")[1]
                brec = _base[bkey]
                row = {"vf": float(vf), "teacher": name, "k": k, **s, "seed": seed, "sset": sset,
                       "t_val": trec["val"], "t_test": trec["test"], "t_epoch": trec["epoch"],
                       "s_val": srec["val"], "s_test": srec["test"], "s_epoch": srec["epoch"],
                       "b_val": brec["val"], "b_test": brec["test"], "b_epoch": brec["epoch"]}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(spec, seed, "teacher %.1fs total %.1fs" % (t1, time.perf_counter() - t0),
                  flush=True)

if __name__ == "__main__":
    args = sys.argv[1:]
    seeds, sset = list(range(5)), "A"
    while args and args[0].startswith("--"):
        if args[0] == "--seeds":
            seeds = [int(x) for x in args[1].split(",")]
        elif args[0] == "--sset":
            sset = args[1]
        args = args[2:]
    d = Path(__file__).resolve().parent / "r2"
    d.mkdir(exist_ok=True)
    out = d / ("grid.jsonl" if seeds == list(range(5)) else "confirm.jsonl")
    main(seeds, sset, args, out)
