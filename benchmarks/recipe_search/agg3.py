"""python agg3.py [r3/grid.jsonl] [key=value ...] → KD candidates ranked by val gain vs the
mixup baseline that a knob would give (bmix for live fm, bmixc same V for cached fmc), also vs
the plain baseline (base, same epochs), and vs plain base at 20 epochs (today's baseline)."""
import collections
import json
import statistics as st
import sys

args = sys.argv[1:]
path = args.pop(0) if args and args[0].endswith(".jsonl") else "r3/grid.jsonl"
flt = [a.split("=", 1) for a in args]
rows = [json.loads(l) for l in open(path)]
idx = {}
for r in rows:
    idx[(r["vf"], r["teacher"], r["seed"], r["mode"], r["a"], r["T"], r["alpha"], r["V"],
         r["epochs"])] = r
g = collections.defaultdict(dict)
for r in rows:
    if r["mode"] in ("base", "bmix", "bmixc") or any(str(r.get(k)) != v for k, v in flt):
        continue
    g[(r["vf"], r["teacher"], r["mode"], r["a"], r["T"], r["alpha"], r["V"], r["epochs"])][r["seed"]] = r


def stats(pairs):
    d = [s - b for s, b in pairs]
    return st.mean(d) * 100, sum(x > 0 for x in d), sum(x < 0 for x in d)


out = []
for key, d in g.items():
    vf, t, mode, a, T, al, V, E = key
    res = {}
    for bname, bkey in (("base", ("base", 0, 0, 0, 0, E)),
                        ("mixb", ({"fm": "bmix", "fmc": "bmixc"}.get(mode, "base"), a, 0, 0, V, E)),
                        ("b20", ("base", 0, 0, 0, 0, 20))):
        bs = [(r, idx.get((vf, t, s, *bkey))) for s, r in d.items()]
        bs = [(r, b) for r, b in bs if b]
        res[bname] = (stats([(r["s_val"], b["s_val"]) for r, b in bs]),
                      stats([(r["s_test"], b["s_test"]) for r, b in bs]),
                      st.mean(b["s_val"] for _, b in bs) * 100,
                      st.mean(b["s_test"] for _, b in bs) * 100)
    rs = list(d.values())
    out.append((key, len(rs), st.mean(r["t_val"] for r in rs) * 100,
                st.mean(r["t_test"] for r in rs) * 100, st.mean(r["s_val"] for r in rs) * 100,
                st.mean(r["s_test"] for r in rs) * 100, res))
out.sort(key=lambda o: (-min(o[6]["mixb"][0][0], o[6]["base"][0][0]), -o[6]["mixb"][0][1]))
print("vf  teacher           mode   a   T   al  V  ep n | Tval  Ttest | Sval  Stest | "
      "vs mixup-baseline: gV W/L gT W/L (Bval Btest) | vs plain same-ep: gV W/L gT W/L | "
      "vs plain ep20: gV gT")
for key, n, tv, tt, sv, stt, res in out:
    vf, t, mode, a, T, al, V, E = key
    m, b, b20 = res["mixb"], res["base"], res["b20"]
    f = lambda s: f"{s[0]:+5.2f} {s[1]}/{s[2]}"
    print(f"{vf:.1f} {t:17} {mode:4} {a:3g} {T:3g} {al:4g} {V:2d} {E:3d} {n} | {tv:5.2f} {tt:5.2f} | "
          f"{sv:5.2f} {stt:5.2f} | {f(m[0])} {f(m[1])} ({m[2]:5.2f} {m[3]:5.2f}) | "
          f"{f(b[0])} {f(b[1])} | {b20[0][0]:+5.2f} {b20[1][0]:+5.2f}")
