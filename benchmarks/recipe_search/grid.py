"""Validation-only screening grid: teacher variants × student settings, seeds 0-4.

Teachers and baselines are trained once per (setting, seed) and reused. Each line of
results/grid.jsonl = one (teacher variant, student setting, seed) with val AND test numbers
(test is stored for the final report but the screen ranks by val only).
python grid.py TEACHER_VARIANT [...]
"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import emulate
from raykd.config import load_config

TEACHERS = {
    "t_default": ({}, {}),
    "t_ls0.1": ({}, {"teacher_ls": 0.1}),
    "t_ls0.3": ({}, {"teacher_ls": 0.3}),
    "t_ep5": ({"teacher.epochs": 5}, {}),
    "t_ep10": ({"teacher.epochs": 10}, {}),
    "t_lr1e-3": ({"teacher.lr": 0.001}, {}),
    "t_d0.5": ({"teacher.args": {"hidden_sizes": [512, 512], "dropout": 0.5}}, {}),
    "t_128": ({"teacher.args": {"hidden_sizes": [128, 128], "dropout": 0.2}}, {}),
    # second round: gentler teachers (smaller logits), optionally cosine for every role
    "t_lr3e-3": ({"teacher.lr": 0.003}, {}),
    "t_lr1e-3_ep15": ({"teacher.lr": 0.001, "teacher.epochs": 15}, {}),
    "t_lr1e-3_cos": ({"teacher.lr": 0.001, "train.schedule": "cosine"}, {}),
    "t_lr3e-4": ({"teacher.lr": 0.0003}, {}),
    "t_lr1e-3_ep10": ({"teacher.lr": 0.001, "teacher.epochs": 10}, {}),
}
STUDENT_SETS = {
    "s1": [dict(width=w, T=T, alpha=a, epochs=20)
           for w in (8, 16, 32) for T, a in ((4, 0.9), (2, 0.9), (2, 0.5), (8, 0.9))],
    "s2": [dict(width=w, T=T, alpha=a, epochs=e)
           for w in (8, 16) for T in (4, 8, 16) for a in (0.9, 1.0) for e in (20, 30)],
    "s3": [dict(width=w, T=T, alpha=0.9, epochs=e)
           for w in (8, 16) for T in (6, 8) for e in (30, 40, 50)],
    "s4": [dict(width=8, T=T, alpha=0.9, epochs=30) for T in (6, 8)],  # val seeds 5-9 check
}
OUT = Path(__file__).resolve().parent / "results" / "grid.jsonl"  # seeds 5-9 runs: grid_confirm.jsonl (see __main__)
_baselines = {}

def student_over(s):
    return {"student.args": {"hidden_sizes": [s["width"]]}, "distill.temperature": s["T"],
            "distill.alpha": s["alpha"], "train.epochs": s["epochs"]}

def main(sset, names):
    STUDENTS = STUDENT_SETS[sset]
    OUT.parent.mkdir(exist_ok=True)
    for name in names:
        t_over, extras = TEACHERS[name]
        for seed in SEEDS:
            t0 = time.perf_counter()
            cfg = load_config(None, {**t_over, "train.seed": seed})
            teacher, trec, _ = emulate.get_teacher(cfg, extras)
            for s in STUDENTS:
                cfg = load_config(None, {**t_over, **student_over(s), "train.seed": seed})
                cache = emulate.teacher_cache(cfg, teacher)
                _, srec = emulate.train_role(cfg, "student", teacher_logits=cache, extras=extras)
                bkey = (s["width"], s["epochs"], seed, cfg.train.schedule, cfg.train.lr)
                if bkey not in _baselines:
                    _baselines[bkey] = emulate.train_role(cfg, "baseline", extras=extras)[1]
                brec = _baselines[bkey]
                row = {"teacher": name, **s, "seed": seed, "sset": sset,
                       "t_val": trec["val"], "t_test": trec["test"], "t_epoch": trec["epoch"],
                       "s_val": srec["val"], "s_test": srec["test"],
                       "b_val": brec["val"], "b_test": brec["test"]}
                with OUT.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(name, seed, "%.1fs" % (time.perf_counter() - t0), flush=True)

if __name__ == "__main__":
    SEEDS = range(5)
    if sys.argv[1] == "--seeds":
        SEEDS = [int(x) for x in sys.argv[2].split(",")]
        OUT = OUT.with_name("grid_confirm.jsonl")
        sys.argv[1:3] = []
    main(sys.argv[1], sys.argv[2:])
