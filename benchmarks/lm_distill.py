"""Language-model distillation measured (issue #19): a GPT-2-shaped teacher trained on Tiny
Shakespeare, its per-token top-k cache, and a small student distilled from it against the same
student trained on the data alone, over several seeds; the top-k cache against a dense one
(k = the vocabulary), and student throughput with the cache, without a teacher and with the
teacher run live on every batch. Not a test.

    .venv/bin/python benchmarks/lm_distill.py --data ../shared/data/tinyshakespeare/input.txt \\
        --json benchmarks/results/lm_distill.json

Every fit is raykd's production path: ``load_config(configs/shakespeare_lm.yaml, overrides)``
and ``run_distill`` (teacher fit, teacher actor + per-token cache, student fit on Ray Train with
2 workers, baseline fit, MLflow). The first call trains the teacher (unless ``--teacher`` names
weights, or ``--work`` already holds the teacher an earlier run of the same settings saved);
every later call points ``teacher.checkpoint`` at those weights, so the cache is built once and
reused by its fingerprint. The dense cache is ``teacher.topk`` = the vocabulary size through the
same code. Distilled student and baseline: same architecture, seed, data, steps and
initialisation (random: ``student.init_from_teacher`` is off for both, so the comparison
isolates the soft targets); the losses are the config's (0.5 CE + 0.5 token_kd, T = 1).

Reported: validation loss in nats per token of the last epoch (``train.keep_checkpoint: last``)
and in nats per character (total nats ÷ characters of the validation text), test loss likewise,
the cache's bytes per token, throughput ratios from this run, wall time, and the load average
before and after each part (the machine may be shared). ``--quick``: a tiny smoke run.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "shakespeare_lm.yaml"
# Budget sized to finish in under 40 minutes on 2 shared CPU cores (see README).
FULL = {"vocab_size": 1024, "topk": 16, "block_size": 128, "batch_size": 8,
        "teacher": {"n_layer": 4, "n_embd": 192, "n_head": 4}, "teacher_epochs": 4,
        "teacher_lr": 1e-3,
        "student": {"n_layer": 2, "n_embd": 128, "n_head": 4}, "epochs": 2, "lr": 2e-3,
        "live_epochs": 1, "seeds": 3,
        "throughput_rounds": 2, "topk_sweep": [64, 256]}
QUICK = {"vocab_size": 300, "topk": 16, "block_size": 32, "batch_size": 8,
         "teacher": {"n_layer": 2, "n_embd": 32, "n_head": 2}, "teacher_epochs": 1,
         "teacher_lr": 3e-3,
         "student": {"n_layer": 1, "n_embd": 32, "n_head": 2}, "epochs": 1, "lr": 3e-3,
         "live_epochs": 1, "seeds": 1,
         "throughput_rounds": 1}
# nanoGPT on Tiny Shakespeare, character level (shared/data/tinyshakespeare/README.md)
NANOGPT = {"gpt_6x384_gpu_val_nats_per_char": 1.47, "gpt_4x128_cpu_val_nats_per_char": 1.88,
           "bigram_val_nats_per_char": 2.5}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def overrides(s: dict[str, Any], data: Path, work: Path, seed: int,
              teacher: Path | None) -> dict[str, Any]:
    block = s["block_size"]
    sets: dict[str, Any] = {
        "data.path": str(data), "data.vocab_size": s["vocab_size"], "data.block_size": block,
        "teacher.args": {"model_type": "gpt2", "config": {**s["teacher"], "n_positions": block}},
        "teacher.epochs": s["teacher_epochs"], "teacher.lr": s["teacher_lr"],
        "teacher.topk": s["topk"], "teacher.cache_dir": str(work / "cache"),
        "student.args": {"model_type": "gpt2", "config": {**s["student"], "n_positions": block}},
        "student.init_from_teacher": False,
        "train.epochs": s["epochs"], "train.lr": s["lr"], "train.batch_size": s["batch_size"],
        "train.num_workers": 2, "train.seed": seed, "train.keep_checkpoint": "last",
        "train.checkpoint_seconds": None, "train.storage_path": str(work / "ray_results"),
        "tracking.uri": f"sqlite:///{work / 'mlflow.db'}", "tracking.experiment": "lm_bench"}
    if teacher is not None:
        sets["teacher.checkpoint"] = str(teacher)
    return sets


def teacher_key(s: dict[str, Any], data: Path) -> str:
    """What a saved teacher depends on: the corpus bytes and the teacher's settings."""
    h = hashlib.sha256(data.read_bytes())
    keys = ("vocab_size", "block_size", "batch_size", "teacher", "teacher_epochs", "teacher_lr")
    h.update(json.dumps({k: s[k] for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:12]


def fit_numbers(part: dict[str, Any]) -> dict[str, Any]:
    """A student or baseline fit of a run_distill summary: last epoch's validation loss, test
    loss, and tokens/s over its training epochs (tokens ÷ seconds, every epoch)."""
    hist = part["history"]
    secs = sum(h["epoch_seconds"] for h in hist)
    tokens = sum(h["tokens_per_s"] * h["epoch_seconds"] for h in hist)
    return {"val_loss": hist[-1]["val_loss"], "test_loss": part["test_loss"],
            "val_loss_by_epoch": [round(h["val_loss"], 4) for h in hist],
            "tokens_per_s": round(tokens / max(secs, 1e-9), 1),
            "tokens_per_s_by_epoch": [round(h["tokens_per_s"], 1) for h in hist],
            "train_seconds": part.get("train_seconds"), "params": part["params"],
            "init_copied": bool(part.get("init_copied"))}


def chars_per_token(cfg, split: str) -> dict[str, float]:
    """Real (label) tokens of a split and the characters they decode to, for nats per char."""
    from tokenizers import Tokenizer

    from raykd.data import build_dataset

    ds = build_dataset(cfg.data, split)
    ids = ds.labels[ds.labels != -100].tolist()
    text = Tokenizer.from_file(ds.info.tokenizer_file).decode(ids)
    return {"tokens": len(ids), "chars": len(text), "chars_per_token": len(text) / len(ids)}


def tail_mass(cache_path: str) -> dict[str, float]:
    """How much of the teacher's probability the top-k leaves to the tail bucket, over the
    cached (train) tokens: mean and median of exp(tail_logmass)."""
    import numpy as np
    import torch

    # the per-token cache's tail column ([N, L] float32, one .npy over its shards)
    tail = torch.from_numpy(np.load(Path(cache_path) / "tail_logmass.npy", allow_pickle=False)
                            ).exp().flatten()
    return {"mean": float(tail.mean()), "median": float(tail.median())}


def teacher_val_loss(cfg, teacher: str, student_ckpt: str) -> dict[str, Any]:
    """Teacher (and one student, a cross-check of its fit's own number) on the validation
    split, in this process (raykd.train.lm_eval.lm_test_report)."""
    from raykd.data import build_dataset
    from raykd.train.checkpoint import load_model
    from raykd.train.lm_eval import lm_test_report

    val = build_dataset(cfg.data, "val")
    return lm_test_report(load_model(teacher, cfg.teacher, val.info),
                          load_model(student_ckpt, cfg.student, val.info, field="student"), val)


def throughput(cfg_of, teacher: Path, rounds: int) -> dict[str, Any]:
    """Student tokens/s without a teacher (the baseline role: CE only), with the top-k cache
    and with the teacher run live on every batch: one-epoch fits of the same student, same
    batch size, interleaved round by round (plain, cached, live) so that a swing in the shared
    machine's load hits all three alike. Each fit is raykd's ``fit()`` on 2 Ray Train workers,
    the teacher served by ``serve_teacher`` as run_distill does."""
    from raykd.teacher.service import serve_teacher, stop_teacher
    from raykd.train.fit import ensure_ray, fit

    ensure_ray()
    rates: dict[str, list[float]] = {"plain": [], "cached": [], "live": []}
    loads = []
    for r in range(rounds):
        for mode in rates:
            cfg = cfg_of(0, teacher, **{"train.epochs": 1}, **(
                {"teacher.mode": "live"} if mode == "live" else {}))
            before = load()
            if mode == "plain":
                result = fit(cfg, "baseline", name=f"tp-plain-{r}")
            else:
                service = serve_teacher(cfg, [str(teacher)], cfg.tracking.uri)
                try:
                    result = fit(cfg, "student", teacher=service.handoff, name=f"tp-{mode}-{r}")
                finally:
                    stop_teacher(service)
            rates[mode].append(round(result.history[-1]["tokens_per_s"], 1))
            loads.append({"fit": f"{mode}-{r}", "load_before": before, "load_after": load()})
            print(f"[lm_distill] throughput {mode} round {r}: {rates[mode][-1]} tokens/s",
                  flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"tokens_per_s": rates, "median": med, "load": loads,
            "cached_over_plain": med["cached"] / med["plain"],
            "online_over_plain": med["live"] / med["plain"],
            "cached_over_plain_by_round": [c / p for c, p in zip(rates["cached"],
                                                                 rates["plain"], strict=True)],
            "online_over_plain_by_round": [c / p for c, p in zip(rates["live"],
                                                                 rates["plain"], strict=True)]}


def part_of(fn, name: str = "") -> dict[str, Any]:
    """A measurement returning a dict, with its seconds, load before and after, and time."""
    before, t0 = load(), time.perf_counter()
    result = fn()
    result.update(seconds=round(time.perf_counter() - t0, 1), load_before=before,
                  load_after=load(),
                  when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return result


def analyse(out: dict[str, Any], s: dict[str, Any], summaries: dict[int, dict[str, Any]],
            dense: dict[str, Any], live: dict[str, Any], cfg0,
            sweep: dict[int, dict[str, Any]] | None = None) -> None:
    """The JSON's measured keys from the run_distill summaries of the run's parts (``sweep``:
    the --topk-sweep fits by k)."""
    val_chars = chars_per_token(cfg0, "val")
    test_chars = chars_per_token(cfg0, "test")
    check = teacher_val_loss(cfg0, out["teacher_path"], summaries[0]["student"]["checkpoint"])
    per_char = 1.0 / val_chars["chars_per_token"]
    t_val = check["teacher"]["loss_nats_per_token"]
    t_test = summaries[0]["teacher"]["test_loss"]
    for seed, summ in summaries.items():
        st, bl = fit_numbers(summ["student"]), fit_numbers(summ["baseline"])
        gap = bl["val_loss"] - t_val
        out["seeds"].append({
            "seed": seed, "student": st, "baseline": bl,
            "student_below_baseline": st["val_loss"] < bl["val_loss"],
            "gap_closed": (bl["val_loss"] - st["val_loss"]) / gap if gap > 0 else None,
            "cached_over_plain": st["tokens_per_s"] / bl["tokens_per_s"],
            "cache": summ["teacher"]["cache"], "seconds": summ["seconds"]})
    rows = out["seeds"]
    first = rows[0]
    cache = summaries[0]["teacher"]["cache"]
    dense_fit, live_fit = fit_numbers(dense["student"]), fit_numbers(live["student"])
    vocab = int(s["vocab_size"])
    mean = statistics.fmean
    plain = statistics.median(r["baseline"]["tokens_per_s"] for r in rows)
    out.update({
        "teacher_val_loss": t_val,
        "baseline_val_loss": mean(r["baseline"]["val_loss"] for r in rows),
        "student_val_loss": mean(r["student"]["val_loss"] for r in rows),
        "gap_closed": mean(r["gap_closed"] for r in rows if r["gap_closed"] is not None)
        if any(r["gap_closed"] is not None for r in rows) else None,
        "gap_closed_min": min((r["gap_closed"] for r in rows if r["gap_closed"] is not None),
                              default=None),
        "student_below_baseline_all_seeds": all(r["student_below_baseline"] for r in rows),
        "topk": int(cache["topk"]), "vocab_size": vocab,
        "cache_bytes_per_token": float(cache["bytes_per_token"]),
        "dense_bytes_per_token": 2 * vocab,  # every logit in fp16
        "dense_cache_bytes_per_token_stored": float(dense["teacher"]["cache"]["bytes_per_token"]),
        "dense_student_val_loss": dense_fit["val_loss"],
        "topk_loss_cost": first["student"]["val_loss"] - dense_fit["val_loss"],
        # Throughput: each seed's student and baseline run back to back, but the machine is
        # shared and its load swings within minutes; the median over the seeds' pairs (and over
        # their plain fits for the live ratio) is the figure, each seed's is kept beside it.
        "cached_over_plain_from_seed_fits": statistics.median(r["cached_over_plain"]
                                                              for r in rows),
        "cached_over_plain_by_seed": [round(r["cached_over_plain"], 3) for r in rows],
        "online_over_plain_from_seed_fits": live_fit["tokens_per_s"] / plain,
        "online_over_plain_seed0": live_fit["tokens_per_s"] / first["baseline"]["tokens_per_s"],
        "tokens_per_s": {"plain_median": plain,
                         "cached_median": statistics.median(r["student"]["tokens_per_s"]
                                                            for r in rows),
                         "plain_by_seed": [r["baseline"]["tokens_per_s"] for r in rows],
                         "cached_by_seed": [r["student"]["tokens_per_s"] for r in rows],
                         "dense_cache": dense_fit["tokens_per_s"],
                         "live": live_fit["tokens_per_s"]},
        "teacher_tail_mass": tail_mass(cache["path"]),
        "dense_fit": dense_fit, "live_fit": live_fit,
        "teacher_test_loss": t_test,
        "student_val_loss_driver_check": check["student"]["loss_nats_per_token"],
        "val_text": val_chars, "test_text": test_chars})
    # the top-k cost curve: seed 0's student at each cache size against the dense cache's
    curve = {int(cache["topk"]): (summaries[0], first["student"]["val_loss"])}
    curve.update({k: (summ, fit_numbers(summ["student"])["val_loss"])
                  for k, summ in (sweep or {}).items()})
    curve[vocab] = (dense, dense_fit["val_loss"])
    out["topk_curve"] = [
        {"topk": k, "bytes_per_token": float(summ["teacher"]["cache"]["bytes_per_token"]),
         "dense_fp16_over_cache": 2 * vocab / float(summ["teacher"]["cache"]["bytes_per_token"]),
         "tail_mass": tail_mass(summ["teacher"]["cache"]["path"]) if k < vocab else None,
         "student_val_loss": val, "loss_cost": val - dense_fit["val_loss"]}
        for k, (summ, val) in sorted(curve.items())]
    tp = out.get("throughput_interleaved")
    for key in ("cached_over_plain", "online_over_plain"):  # interleaved fits when measured
        out[key] = tp[key] if tp else out[f"{key}_from_seed_fits"]
    out["throughput_source"] = ("throughput_interleaved: one-epoch fits, plain/cached/live "
                                "interleaved, median over rounds" if tp else
                                "seed fits (median over seeds) and the live fit")
    out["ratio_dense_over_cache"] = out["dense_bytes_per_token"] / out["cache_bytes_per_token"]
    out["nats_per_char"] = {
        "val": {k: out[f"{k}_val_loss"] * per_char for k in ("teacher", "baseline", "student")},
        "test": {"teacher": t_test / test_chars["chars_per_token"],
                 "baseline": mean(r["baseline"]["test_loss"] for r in rows)
                 / test_chars["chars_per_token"],
                 "student": mean(r["student"]["test_loss"] for r in rows)
                 / test_chars["chars_per_token"]},
        "nanogpt_char_level": NANOGPT}
    out["goals"] = {
        "student_below_baseline_each_seed": out["student_below_baseline_all_seeds"],
        "gap_closed_ge_0.25": out["gap_closed_min"] is not None and out["gap_closed_min"] >= 0.25,
        "dense_over_cache_ge_30": out["ratio_dense_over_cache"] >= 30,
        "topk_loss_cost_le_0.01": out["topk_loss_cost"] <= 0.01,
        "cached_over_plain_ge_0.95": out["cached_over_plain"] >= 0.95}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the corpus (a .txt file)")
    p.add_argument("--json", type=Path, required=True, help="where the results go")
    p.add_argument("--work", type=Path, default=None,
                   help="caches, MLflow store, teacher weights (default: a folder under the "
                        "system's temp dir; the teacher is reused from it by corpus + settings)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher weights (a raykd checkpoint of the same teacher settings)")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny models, 1 seed: a smoke run")
    p.add_argument("--reanalyse", action="store_true",
                   help="no fits: recompute the JSON from the summaries a finished run left in "
                        "--work (its run.json: parts, timings and load as measured then)")
    p.add_argument("--throughput-rounds", type=int, default=None,
                   help="rounds of the interleaved throughput fits (default 2; --quick 1)")
    p.add_argument("--topk-sweep", default=None,
                   help="more cache sizes k for the top-k cost curve, comma-separated (default "
                        f"{','.join(map(str, FULL['topk_sweep']))}; --quick: none; 0: none): "
                        "one seed-0 student per k, beside the main top-k and the dense one")
    p.add_argument("--throughput-only", action="store_true",
                   help="only the interleaved plain/cached/live throughput fits, added to the "
                        "JSON of a finished run (its teacher and caches in --work)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    s = dict(QUICK if args.quick else FULL)
    if args.seeds:
        s["seeds"] = args.seeds
    if args.throughput_rounds is not None:
        s["throughput_rounds"] = args.throughput_rounds
    if args.topk_sweep is not None:
        s["topk_sweep"] = [int(k) for k in args.topk_sweep.split(",") if int(k)]
    data = args.data.resolve()
    default = Path(tempfile.gettempdir()) / f"raykd_lm_distill{'_quick' if args.quick else ''}"
    work = (args.work or default).resolve()
    work.mkdir(parents=True, exist_ok=True)
    saved = work / f"teacher-{teacher_key(s, data)}" / "model.safetensors"
    teacher = args.teacher.resolve() if args.teacher else (saved if saved.is_file() else None)

    from raykd.config import load_config
    from raykd.schemes.offline import run_distill

    def cfg_of(seed: int, path: Path | None, **extra: Any):
        return load_config(CONFIG, {**overrides(s, data, work, seed, path), **extra})

    if args.throughput_only:  # added to a finished run: same teacher and caches, later
        run = json.loads((work / "run.json").read_text())
        run["throughput_interleaved"] = part_of(
            lambda: throughput(cfg_of, Path(run["teacher_path"]), s["throughput_rounds"]))
        run["throughput_interleaved"]["note"] = (
            "measured after the main run (--throughput-only), same teacher and caches")
        (work / "run.json").write_text(json.dumps(run, indent=1, default=str))
    if args.reanalyse or args.throughput_only:
        out = json.loads((work / "run.json").read_text())
        out["seeds"] = []
        summaries = {i: json.loads((work / f"summary-seed{i}.json").read_text())
                     for i in range(s["seeds"])}
        dense, live = (json.loads((work / f"summary-{n}.json").read_text())
                       for n in ("dense_cache", "live"))
        sweep = {k: json.loads((work / f"summary-topk{k}.json").read_text())
                 for k in out["settings"].get("topk_sweep", [])}
        analyse(out, s, summaries, dense, live, cfg_of(0, Path(out["teacher_path"])), sweep)
        out["reanalysed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return write(args.json, out)

    out: dict[str, Any] = {
        "settings": {**s, "init_from_teacher": False, "losses": "0.5 ce + 0.5 token_kd, T=1",
                     "num_workers": 2, "data": str(args.data), "quick": args.quick},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "parts": {}, "seeds": []}

    def part(name: str, fn):
        before, t0 = load(), time.perf_counter()
        result = fn()
        out["parts"][name] = {"seconds": round(time.perf_counter() - t0, 1),
                              "load_before": before, "load_after": load()}
        print(f"[lm_distill] {name}: {out['parts'][name]}", flush=True)
        (work / f"summary-{name}.json").write_text(json.dumps(result, indent=1, default=str))
        return result

    # seed 0: the teacher (trained now unless given), the top-k cache, student and baseline
    summaries = {}
    for seed in range(s["seeds"]):
        summaries[seed] = part(f"seed{seed}", lambda seed=seed: run_distill(
            cfg_of(seed, teacher), baseline=True, run_name=f"seed{seed}"))
        if teacher is None:  # the run's own teacher, kept for every later call (and rerun)
            t = summaries[seed]["teacher"]
            saved.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(t["checkpoint"], saved)
            teacher = saved
            out["teacher_fit"] = {k: t.get(k) for k in ("wall_seconds", "epochs", "params")}
    out["teacher_trained_this_run"] = "teacher_fit" in out
    dense = part("dense_cache", lambda: run_distill(
        cfg_of(0, teacher, **{"teacher.topk": s["vocab_size"]}), run_name="dense"))
    for k in s["topk_sweep"]:  # the cost curve: the same seed-0 student at more cache sizes
        part(f"topk{k}", lambda k=k: run_distill(cfg_of(0, teacher, **{"teacher.topk": k}),
                                                 run_name=f"topk{k}"))
    live = part("live", lambda: run_distill(
        cfg_of(0, teacher, **{"teacher.mode": "live", "train.epochs": s["live_epochs"]}),
        run_name="live"))
    if s["throughput_rounds"]:
        out["throughput_interleaved"] = part_of(
            lambda: throughput(cfg_of, teacher, s["throughput_rounds"]), "throughput")
    out["teacher_path"] = str(teacher)
    out["fits_seconds"] = round(time.perf_counter() - started, 1)
    (work / "run.json").write_text(json.dumps(out, indent=1, default=str))
    sweep = {k: json.loads((work / f"summary-topk{k}.json").read_text())
             for k in s["topk_sweep"]}
    analyse(out, s, summaries, dense, live, cfg_of(0, teacher), sweep)
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    out["load_end"] = load()
    run = json.loads((work / "run.json").read_text())  # kept for --reanalyse/--throughput-only
    run.update(wall_seconds=out["wall_seconds"], load_end=out["load_end"])
    (work / "run.json").write_text(json.dumps(run, indent=1, default=str))
    return write(args.json, out)


def write(path: Path, out: dict[str, Any]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    keys = ("teacher_val_loss", "baseline_val_loss", "student_val_loss", "gap_closed",
            "topk_loss_cost", "cached_over_plain", "online_over_plain", "wall_seconds")
    print(json.dumps({k: out[k] for k in keys} | {"goals": out["goals"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
