#!/usr/bin/env python
"""Benchmark: Hinton et al. (2015) §3 on MNIST through raykd, at the configs' default budget.

Runs the whole Hinton job (teacher, baseline, distilled, omitted-3, only-7-8) in a fresh working
folder — its own MLflow sqlite file, teacher cache and Ray Train storage, so the teacher is trained,
not reused — and writes one flat JSON record::

    teacher_errors, baseline_errors, distilled_errors    test errors (of the 10,000 test images)
    gap_closed                                           (baseline − distilled)
                                                         / (baseline − teacher)
    omitted_errors_before / _after                       test errors, no 3s in the transfer set,
    omitted_class_errors_before / _after                 ... and those on the test 3s,
                                                         before / after the class-3 bias shift
    two_class_error_before / _after                      test error rate (fraction), transfer set
                                                         of only 7s and 8s, before / after the shift
    wall_seconds                                         the whole job, Ray start-up included
    seeds, *_per_seed, gap_closed_sd                     the table's seeds (hinton.seeds) and
                                                         each seed's counts; with several seeds
                                                         the three counts above are means

plus the chosen shifts, the settings, the paper's numbers and the markdown table.

    python benchmarks/hinton_mnist.py --data-root ../shared/data/mnist \\
        --json benchmarks/results/hinton_mnist.json
    # the table over three seeds (mean and each seed's count; the gap closed from the means):
    python benchmarks/hinton_mnist.py --set 'hinton.seeds=[0,1,2]' --json /tmp/hinton3.json
    # a longer budget (e.g. on a GPU), every --set goes to the job:
    python benchmarks/hinton_mnist.py --set teacher.epochs=200 --set train.epochs=100 \\
        --set train.use_gpu=true --set train.num_workers=1 --json /tmp/hinton_long.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data-root", default="../shared/data/mnist",
                   help="MNIST folder in torchvision layout (default: ../shared/data/mnist)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "hinton_mnist.json"),
                   help="where to write the record (default: benchmarks/results/hinton_mnist.json)")
    p.add_argument("--markdown", default=None, help="also write the comparison table here")
    p.add_argument("--config", default=str(REPO / "configs" / "mnist_hinton_distill.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed on to the job (default budget when none)")
    p.add_argument("--workdir", default=None,
                   help="working folder for MLflow, caches and Ray Train (default: a new temp dir)")
    p.add_argument("--from-summary", default=None, metavar="PATH",
                   help="write the record from a finished job's summary.json instead of running "
                        "(wall_seconds is then null; job_seconds comes from the summary)")
    return p.parse_args(argv)


def flat_record(summary: dict, wall: float | None, overrides: list[str],
                data_root: str) -> dict:
    """The flat record of one finished job's summary. Experiments left out by
    ``hinton.experiments`` give None for their fields instead of failing after the run."""
    from raykd.schemes.hinton.report import BENCHMARK_KEYS, SEED_KEYS

    record = {k: summary["benchmark"][k] for k in BENCHMARK_KEYS + SEED_KEYS}
    omitted, two = summary.get("omitted") or {}, summary.get("two_class") or {}
    shift_split = (omitted or two).get("shift", {}).get("split")
    record.update(
        wall_seconds=None if wall is None else round(wall, 1), job_seconds=summary["seconds"],
        experiments=summary.get("experiments"),
        omitted_class=omitted["classes"][0] if omitted else None,
        omitted_shift=omitted["shift"]["delta"] if omitted else None,
        omitted_transfer_size=omitted.get("transfer_size"),
        two_classes=two.get("classes"),
        two_class_shift=two["shift"]["delta"] if two else None,
        two_class_transfer_size=two.get("transfer_size"),
        two_class_errors_before=two.get("errors_before"),
        two_class_errors_after=two.get("errors_after"),
        shift_split=shift_split,
        test_size=(summary.get("table") or {}).get("test_size"),
        train_seconds={f"{role}-seed{r['seed']}": r[role].get("train_seconds")
                       for r in summary.get("seed_runs") or []
                       for role in ("baseline", "distilled")},
        teacher_val_accuracy=summary["teacher"].get("val_accuracy"),
        settings=summary["settings"], overrides=overrides, paper=summary["paper"],
        data_root=data_root, machine={"platform": platform.platform(),
                                      "cpus": os.cpu_count(), "python": platform.python_version()},
        mlflow=summary["mlflow"], markdown=summary["markdown"])
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_root = str(Path(args.data_root).expanduser().resolve())
    out = Path(args.json).expanduser().resolve()
    markdown = Path(args.markdown).expanduser().resolve() if args.markdown else None
    if args.from_summary:  # rebuild the record of a finished job; nothing is run
        source = Path(args.from_summary).expanduser().resolve()
        if not source.is_file():
            print(f"benchmark: --from-summary {source}: no such file; give the job's "
                  f"summary.json (in its --workdir)", file=sys.stderr)
            return 2
        summary, wall = json.loads(source.read_text()), None
    else:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raykd-hinton-bench-")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
        from raykd.cli import main as raykd_main

        summary_path = workdir / "summary.json"
        started = time.perf_counter()
        rc = raykd_main(["hinton-mnist", "--config", str(Path(args.config).resolve()),
                         "--data-root", data_root,
                         *sum((["--set", o] for o in args.overrides), []),
                         "--summary", str(summary_path)])
        wall = time.perf_counter() - started
        if rc != 0:
            print(f"benchmark: the job failed (exit {rc}); nothing written", file=sys.stderr)
            return rc
        summary = json.loads(summary_path.read_text())
    from raykd.schemes.hinton.report import BENCHMARK_KEYS, SEED_KEYS

    record = flat_record(summary, wall, args.overrides, data_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(summary["markdown"])
    print(json.dumps({k: record[k] for k in (*BENCHMARK_KEYS, *SEED_KEYS, "wall_seconds")},
                     indent=2))
    took = "" if wall is None else f" ({wall / 60:.1f} min)"
    print(f"benchmark: wrote {out}{took}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
