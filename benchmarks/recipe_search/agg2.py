"""python agg2.py [FILE] [filter=value ...]  → candidates ranked by mean val gain (val only)."""
import json, sys, collections, statistics as st
args = sys.argv[1:]
path = args.pop(0) if args and args[0].endswith(".jsonl") else "r2/grid.jsonl"
flt = [a.split("=", 1) for a in args]
rows = [json.loads(l) for l in open(path)]
g = collections.defaultdict(dict)
for r in rows:
    if any(str(r.get(k)) != v for k, v in flt):
        continue
    g[(r["vf"], r["teacher"], r["width"], r["T"], r["alpha"], r["epochs"], r["lstd"])][r["seed"]] = r
out = []
for key, d in g.items():
    rs = list(d.values())
    dv = [r["s_val"] - r["b_val"] for r in rs]; dt = [r["s_test"] - r["b_test"] for r in rs]
    out.append((st.mean(dv), sum(x > 0 for x in dv), sum(x < 0 for x in dv), st.mean(dt),
                sum(x > 0 for x in dt), sum(x < 0 for x in dt), key, len(rs),
                st.mean(r["t_val"] for r in rs), st.mean(r["t_test"] for r in rs),
                st.mean(r["b_val"] for r in rs), st.mean(r["b_test"] for r in rs)))
out.sort(key=lambda o: (-o[0], -o[1]))
print(f"{'vf':>4} {'teacher':18} {'w':>3} {'T':>3} {'a':>4} {'ep':>3} lstd n | Tval  Ttest | Bval  Btest | gainV  W/L  | gainT  W/L")
for dv, wv, lv, dt, wt, lt, k, n, tv, tt, bv, bt in out:
    print(f"{k[0]:4.1f} {k[1]:18} {k[2]:3d} {k[3]:3g} {k[4]:4g} {k[5]:3d} {int(k[6]):4d} {n} | {100*tv:5.2f} {100*tt:5.2f} | "
          f"{100*bv:5.2f} {100*bt:5.2f} | {100*dv:+5.2f} {wv}/{lv} | {100*dt:+5.2f} {wt}/{lt}")
