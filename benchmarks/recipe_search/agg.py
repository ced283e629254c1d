import json, sys, collections, statistics
rows = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else "results/grid.jsonl")]
g = collections.defaultdict(list)
for r in rows:
    if len(sys.argv) > 2 and not any(r["teacher"] == t or r.get("sset") == t for t in sys.argv[2:]):
        continue
    g[(r["teacher"], r["width"], r["T"], r["alpha"], r["epochs"], r.get("sset", "s1"))].append(r)
out = []
for k, rs in g.items():
    if len(rs) < 5 or len({r["seed"] for r in rs}) != len(rs): continue
    dv = [r["s_val"] - r["b_val"] for r in rs]; dt = [r["s_test"] - r["b_test"] for r in rs]
    out.append((statistics.mean(dv), sum(d > 0 for d in dv), statistics.mean(dt), sum(d > 0 for d in dt), k,
                statistics.mean(r["t_val"] for r in rs), statistics.mean(r["t_test"] for r in rs),
                statistics.mean(r["s_val"] for r in rs), statistics.mean(r["b_val"] for r in rs)))
out.sort(key=lambda o: (-o[0], -o[1]))
print("teacher      w  T  alpha ep |  T val T test |  S val  B val  gainV winV | gainT winT")
for dv, wv, dt, wt, k, tv, tt, sv, bv in out:
    print(f"{k[0]:14s} {k[1]:3d} {k[2]:2g} {k[3]:4g} {k[4]:3d} | {100*tv:6.2f} {100*tt:6.2f} | {100*sv:6.2f} {100*bv:6.2f} {100*dv:+6.2f} {wv}/5 | {100*dt:+6.2f} {wt}/5")
