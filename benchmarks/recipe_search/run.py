"""Run named recipes over train seeds 0-4: python run.py NAME [NAME...]  (or `all`, `table`).

Each recipe = config overrides for the embedded digits.yaml (+ emulation extras). Results go to
results/NAME.json; `python run.py table` prints the summary table of every finished recipe.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
SEEDS = [0, 1, 2, 3, 4]

# name → (overrides, extras). extras: select=best|last, teacher_ls=float.
RECIPES: dict[str, tuple[dict, dict]] = {
    # today's default, exactly as shipped (last-epoch checkpoints), and with best-val selection
    "R0_default_last": ({}, {"select": "last"}),
    "R1_default_best": ({}, {}),
}


def register(name, overrides, extras=None):
    RECIPES[name] = (overrides, extras or {})


# --- candidates (added as the search proceeds) -------------------------------------------------
register("R2_tjit1", {"teacher.jitter": 1})
register("R3_replay_j1", {"teacher.jitter": 1, "teacher.mode": "replay", "teacher.views": 4,
                          "train.jitter": 1})
register("R4_s16", {"student.args": {"hidden_sizes": [16]}})
register("R5_tjit1_s16", {"teacher.jitter": 1, "student.args": {"hidden_sizes": [16]}})
register("R6_replay_j1_s16", {"teacher.jitter": 1, "teacher.mode": "replay", "teacher.views": 4,
                              "train.jitter": 1, "student.args": {"hidden_sizes": [16]}})
register("R7_tls01", {}, {"teacher_ls": 0.1})

# grid over student width × (T, alpha), constant lr, best-val selection, default teacher
for width in (32, 16, 8):
    for temp, alpha in ((4.0, 0.9), (2.0, 0.5), (1.0, 0.5), (4.0, 0.5)):
        register(f"G_s{width}_T{temp:g}_a{alpha:g}",
                 {"student.args": {"hidden_sizes": [width]}, "distill.temperature": temp,
                  "distill.alpha": alpha})

# top of the validation screen (grid.py): gentle teacher (lr 0.001, 15 epochs), 8-unit student
for temp in (6.0, 8.0):
    register(f"C_s8_tlr1e-3_tep15_T{temp:g}_e30",
             {"teacher.lr": 0.001, "teacher.epochs": 15, "student.args": {"hidden_sizes": [8]},
              "distill.temperature": temp, "distill.alpha": 0.9, "train.epochs": 30})


def summarize(name: str, rows: list[dict]) -> dict:
    def gains(split):
        return [r["student"][split] - r["baseline"][split] for r in rows]

    out = {"name": name, "seeds": [r["seed"] for r in rows]}
    for split in ("val", "test"):
        g = gains(split)
        out[f"{split}_gain_mean"] = 100 * statistics.mean(g)
        out[f"{split}_wins"] = sum(x > 0 for x in g)
        out[f"{split}_ties"] = sum(x == 0 for x in g)
        for role in ("teacher", "student", "baseline"):
            out[f"{role}_{split}_mean"] = 100 * statistics.mean(r[role][split] for r in rows)
    out["seconds_mean"] = statistics.mean(r["seconds"] for r in rows)
    out["epochs_total"] = rows[0]["epochs_total"]
    return out


def run(name: str) -> None:
    from emulate import run_seed

    overrides, extras = RECIPES[name]
    rows = []
    t0 = time.perf_counter()
    for s in SEEDS:
        r = run_seed(overrides, extras, s)
        rows.append(r)
        print(f"{name} seed {s}: teacher {r['teacher']['val']:.4f}/{r['teacher']['test']:.4f} "
              f"(ep {r['teacher']['epoch']}) student {r['student']['val']:.4f}/"
              f"{r['student']['test']:.4f} (ep {r['student']['epoch']}) baseline "
              f"{r['baseline']['val']:.4f}/{r['baseline']['test']:.4f} "
              f"(ep {r['baseline']['epoch']})  [{r['seconds']:.1f}s]", flush=True)
    summ = summarize(name, rows)
    summ["wall_seconds"] = round(time.perf_counter() - t0, 1)
    RES.mkdir(exist_ok=True)
    (RES / f"{name}.json").write_text(json.dumps(
        {"name": name, "overrides": overrides, "extras": extras, "summary": summ, "rows": rows},
        indent=1))
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                      for k, v in summ.items()}), flush=True)


def table() -> None:
    print(f"{'recipe':28s} {'T val':>6s} {'T test':>6s} {'S val':>6s} {'B val':>6s} "
          f"{'gain val':>8s} {'wins':>4s} {'S test':>6s} {'B test':>6s} {'gain tst':>8s} "
          f"{'wins':>4s} {'ep':>4s} {'wall':>5s}")
    for p in sorted(RES.glob("*.json")):
        s = json.loads(p.read_text())["summary"]
        print(f"{s['name']:28s} {s['teacher_val_mean']:6.2f} {s['teacher_test_mean']:6.2f} "
              f"{s['student_val_mean']:6.2f} {s['baseline_val_mean']:6.2f} "
              f"{s['val_gain_mean']:+8.2f} {s['val_wins']:>2d}/5 "
              f"{s['student_test_mean']:6.2f} {s['baseline_test_mean']:6.2f} "
              f"{s['test_gain_mean']:+8.2f} {s['test_wins']:>2d}/5 {s['epochs_total']:4d} "
              f"{s['wall_seconds']:5.0f}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    names = sys.argv[1:]
    if names == ["table"]:
        table()
        sys.exit(0)
    if names == ["all"]:
        names = list(RECIPES)
    for n in names:
        run(n)
