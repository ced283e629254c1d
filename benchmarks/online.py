"""Online distillation measured: DML, ONE, BYOT and codistillation against the same nets
trained alone (issue #17; not a test).

Each run is one `raykd online --baseline` process in a fresh folder with its own MLflow store:

- ``digits``: every scheme, seeds 0..N-1, on the embedded digits data (a 64-64 MLP student;
  ONE splits after ``layers.0``, BYOT has one exit there);
- ``mnist``: every scheme once on the MNIST copy with 800-800 MLPs (ONE splits after
  ``layers.0``, BYOT exits at ``layers.0``), and codistillation at S ∈ {1, 10, 100} steps;
  saved after each run, and a rerun skips the runs already in the JSON.

    python benchmarks/online.py --mnist ../shared/data/mnist --json benchmarks/results/online.json

Written per run: members, ensemble and baseline test accuracies, the exchange's counts and
staleness (codistillation), wall time and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTRA = {"dml": [], "one": ["--set", "online.split_at=layers.0"],
         "byot": ["--set", "online.exits=[layers.0]"],
         "codistill": ["--set", "train.num_workers=1"]}
# a 64-64 MLP student (two hidden layers: ONE's branches and BYOT's exit have depth to work
# with), Adam lr 0.01, 20 epochs, the epoch kept by validation accuracy
DIGITS = ["--set", "student.args.hidden_sizes=[64,64]"]
MNIST = ["--set", "data.name=mnist", "--set", "student.args.hidden_sizes=[800,800]",
         "--set", "train.lr=0.001", "--set", "train.schedule=cosine",
         "--set", "train.keep_checkpoint=last", "--set", "train.checkpoint_every=5"]


def run(scheme: str, args: list[str], log: Path, baseline: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="raykd-online-") as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "raykd.cli", "online", "--scheme", scheme,
               *(["--baseline"] if baseline else []), *EXTRA[scheme], *args, "--set", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
               "--summary", str(summary)]
        load, t0 = os.getloadavg(), time.perf_counter()
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            rc = subprocess.run(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
        if rc != 0:
            raise SystemExit(f"{scheme} failed (rc {rc}); see {log}")
        s = json.loads(summary.read_text())
        row = {"members": {m["name"]: m["accuracy"] for m in s["members"]},
               "ensemble": s["ensemble"]["accuracy"],
               "baseline": {b["name"]: b["accuracy"] for b in s.get("baseline", [])},
               "seconds": round(time.perf_counter() - t0, 1), "load": [load, os.getloadavg()]}
        if "exchange" in s:
            row["exchange"] = s["exchange"]
        print(f"{scheme} {' '.join(args[-2:])}: {row['members']} ensemble "
              f"{row['ensemble']:.4f} alone {row['baseline']}", flush=True)
        return row


def digits(scheme: str, seeds: int, log: Path) -> dict:
    rows = [run(scheme, [*DIGITS, "--set", f"train.seed={seed}"], log) for seed in range(seeds)]
    names = list(rows[0]["members"])
    return {"runs": rows, "mean": {
        **{n: statistics.fmean(r["members"][n] for r in rows) for n in names},
        "ensemble": statistics.fmean(r["ensemble"] for r in rows),
        **{f"{n} alone": statistics.fmean(r["baseline"][n] for r in rows)
           for n in rows[0]["baseline"]}}}


def mnist(root: str, epochs: int, log: Path, out: dict, save) -> dict:
    """Every scheme once, then codistillation's S sweep; ``save()`` after each run."""
    common = [*MNIST, "--set", f"data.root={root}", "--set", f"train.epochs={epochs}"]
    for scheme in ("dml", "one", "byot"):
        if scheme not in out:
            out[scheme] = run(scheme, common, log)
            save()
    sweep = out.setdefault("codistill", {})
    for s in (10, 1, 100):  # the groups alone do not depend on S: trained once, with S = 10
        if str(s) not in sweep:
            sweep[str(s)] = run("codistill", [*common, "--set", f"online.staleness_steps={s}"],
                                log, baseline=s == 10)
            save()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--mnist", metavar="DIR")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mnist-epochs", type=int, default=8)
    p.add_argument("--only", default="digits,mnist")
    p.add_argument("--schemes", default="dml,one,byot,codistill", help="digits: which to run")
    args = p.parse_args()
    out = Path(args.json).resolve()
    log = out.with_suffix(".log")
    result = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        if name == "digits":
            result.setdefault(name, {})
            for scheme in args.schemes.split(","):
                result[name][scheme] = digits(scheme, args.seeds, log)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2))  # after each scheme
        elif name == "mnist":
            if not args.mnist:
                raise SystemExit("mnist needs --mnist DIR")
            def save() -> None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2))

            result[name] = mnist(str(Path(args.mnist).resolve()), args.mnist_epochs, log,
                                 result.setdefault(name, {}), save)
        else:
            raise SystemExit(f"--only: unknown part {name!r}")
        result[name]["benchmark_seconds"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"{name}: done in {result[name]['benchmark_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
