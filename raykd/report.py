"""`raykd report`: compare the models of an MLflow experiment on this machine.

Every finished run that trained a model — teacher, student, baseline, a search's best trial —
and logged a test accuracy with its weights becomes a row: accuracy, trainable parameters, size
of the weights on disk, and inference latency per sample measured here (batch of one, one CPU
thread, median of repeated timings). Teachers given to `raykd distill` as checkpoints appear
through the distill run that used them. Rows repeated over seeds are also summarised as mean ±
standard deviation. The markdown table, a JSON copy and PNG plots are written to ``out_dir`` and
logged to a ``report`` run in the same experiment.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raykd import tracking
from raykd.checksums import file_sha256
from raykd.config import URI_SCHEMES, ConfigError, ModelConfig
from raykd.models import build_model
from raykd.models.registry import example_input
from raykd.schemes.lineage import chain_markdown, read_chains

MODEL_ROLES = ("teacher", "student", "baseline", "trial")
WEIGHT_FOLDERS = ("checkpoint", "teacher", "model")
ROLE_ORDER = {"teacher": 0, "baseline": 1, "student": 2, "trial": 3}


def _find_weights(client, run_id: str) -> str | None:
    """Artifact path of the run's .safetensors weights (checkpoint/ or teacher/)."""
    for folder in WEIGHT_FOLDERS:
        try:
            items = client.list_artifacts(run_id, folder)
        except Exception:  # noqa: BLE001 - a missing folder is not an error
            continue
        for item in items:
            if not item.is_dir and item.path.endswith(".safetensors"):
                return item.path
    return None


def _download(uri: str, run_id: str, artifact: str, dest: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                    tracking_uri=uri, dst_path=str(dest)))


def measure_latency(model: torch.nn.Module, example: torch.Tensor, repeats: int = 5,
                    min_seconds: float = 0.2) -> float:
    """Median seconds per single-sample forward pass on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model.eval().cpu()
        with torch.inference_mode():
            for _ in range(10):
                model(example)
            timings = []
            for _ in range(repeats):
                n, start = 0, time.perf_counter()
                while True:
                    model(example)
                    n += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_seconds or n >= 5000:
                        break
                timings.append(elapsed / n)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(timings)


def describe_weights(path: Path) -> dict[str, Any]:
    """Parameters, size and latency of a raykd safetensors checkpoint (self-describing)."""
    from raykd.train.checkpoint import read_checkpoint

    state, spec, info = read_checkpoint(path)
    params = int(sum(t.numel() for k, t in state.items()
                     if t.is_floating_point() and "running_" not in k))
    out: dict[str, Any] = {"params": params, "size_bytes": path.stat().st_size,
                           "latency_ms": None, "model": None}
    if spec and info:
        model = build_model(ModelConfig(**spec), info, field="model")
        model.load_state_dict(state, strict=False)
        out["latency_ms"] = measure_latency(model, example_input(model, info, 1)) * 1e3
        out["model"] = f"{spec['name']} {json.dumps(spec.get('args', {}), sort_keys=True)}"
    return out


def _params_of(run) -> dict[str, str]:
    return dict(run.data.params)


def _label(role: str, params: dict[str, str], tags: dict[str, str] | None = None) -> str:
    for tag, word in (("raykd.generation", "born-again generation"),
                      ("raykd.round", "noisy-student round")):
        if (tags or {}).get(tag, "").isdigit():  # a member of a lineage: its place in it
            return f"{word} {tags[tag]}"
    if role == "teacher":
        return "teacher"
    if role == "baseline":
        return "baseline (hard labels)"
    tag = "tuned KD student" if role == "trial" else "KD student"
    t, a = params.get("distill.temperature"), params.get("distill.alpha")
    return f"{tag} T={t} α={a}" if t is not None else tag


def collect_rows(uri: str, experiment: str, work: Path) -> list[dict[str, Any]]:
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no MLflow experiment named {experiment!r} at {uri}; "
                          f"give the experiment of a distill/tune run (tracking.experiment) and "
                          f"--tracking-uri where it was logged")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              max_results=5000)
    by_id = {r.info.run_id: r for r in runs}
    rows: list[dict[str, Any]] = []
    seen_teachers: set[str] = set()

    def add(run, role: str, weights: Path, accuracy: float, params: dict[str, str],
            source: str) -> None:
        digest = file_sha256(weights)
        if role == "teacher":
            if digest in seen_teachers:
                return
            seen_teachers.add(digest)
        desc = describe_weights(weights)
        rows.append({"role": role, "label": _label(role, params, run.data.tags),
                     "run_id": run.info.run_id,
                     "run_name": run.info.run_name, "accuracy": accuracy,
                     "seed": params.get("train.seed"), "temperature":
                     params.get("distill.temperature") if role in ("student", "trial") else None,
                     "alpha": params.get("distill.alpha") if role in ("student", "trial")
                     else None, "source": source, "sha256": digest[:12], **desc})

    for i, run in enumerate(sorted(runs, key=lambda r: r.info.start_time or 0)):
        role = run.data.tags.get("raykd.role")
        acc = run.data.metrics.get("test_accuracy")
        if role not in MODEL_ROLES or acc is None:
            continue
        artifact = _find_weights(client, run.info.run_id)
        if artifact is None:
            continue
        weights = _download(uri, run.info.run_id, artifact, work / f"run{i}")
        params = _params_of(run)
        parent = by_id.get(run.data.tags.get("mlflow.parentRunId", ""))
        if parent is not None and role in ("student", "baseline"):
            params = {**_params_of(parent), **params}  # distill logs the config on the parent
        add(run, role, weights, acc, params, f"runs:/{run.info.run_id}/{artifact}")

    # Teachers handed to `raykd distill` as a checkpoint have no run of their own.
    for i, run in enumerate(runs):
        params = _params_of(run)
        source, acc = params.get("teacher.checkpoint"), run.data.metrics.get(
            "teacher_test_accuracy")
        if not source or source == "None" or acc is None:
            continue
        try:
            if source.startswith(URI_SCHEMES):
                weights = tracking.download(uri, source)
            else:
                weights = Path(source)
            if weights.is_file():
                add(run, "teacher", weights, acc, params, source)
        except Exception:  # noqa: BLE001 - an unreachable teacher only loses its row
            continue
    rows.sort(key=lambda r: (ROLE_ORDER.get(r["role"], 9), r["label"], str(r["seed"])))
    return rows


def group_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± standard deviation of rows that differ only by seed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["role"], r["label"], r["model"]), []).append(r)
    out = []
    for (role, label, model), members in groups.items():
        accs = [m["accuracy"] for m in members]
        out.append({"role": role, "label": label, "model": model, "n": len(members),
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "min": min(accs), "max": max(accs),
                    "seeds": [m["seed"] for m in members]})
    return out


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def markdown(experiment: str, uri: str, rows: list[dict[str, Any]],
             groups: list[dict[str, Any]]) -> str:
    import platform

    lines = [f"# raykd report — experiment `{experiment}`", "",
             f"Tracking URI `{uri}`. Latency: one sample per forward pass, 1 CPU thread, median "
             f"of 5 timings, measured on `{platform.node()}` "
             f"({platform.processor() or platform.machine()}).",
             "",
             "| model | accuracy (test) | params | size on disk | latency / sample | seed | run |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lat = f"{r['latency_ms']:.3f} ms" if r["latency_ms"] is not None else "n/a"
        lines.append(f"| {r['label']} | {r['accuracy'] * 100:.2f}% | {r['params']:,} | "
                     f"{_size(r['size_bytes'])} | {lat} | {r['seed'] or ''} | "
                     f"`{r['run_id'][:8]}` {r['run_name'] or ''} |")
    multi = [g for g in groups if g["n"] > 1]
    if multi:
        lines += ["", "## Over seeds", "",
                  "| model | runs | mean accuracy | std | min | max |",
                  "|---|---:|---:|---:|---:|---:|"]
        for g in multi:
            lines.append(f"| {g['label']} | {g['n']} | {g['mean'] * 100:.2f}% | "
                         f"{g['std'] * 100:.2f} | {g['min'] * 100:.2f}% | {g['max'] * 100:.2f}% |")
    return "\n".join(lines) + "\n"


COLORS = {"teacher": "tab:red", "baseline": "tab:gray", "student": "tab:blue",
          "trial": "tab:green"}


def plots(rows: list[dict[str, Any]], uri: str, out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    if not rows:
        return paths
    fig = Figure(figsize=(6.4, 4.8), dpi=110)
    ax = fig.add_subplot()
    for role in COLORS:
        sel = [r for r in rows if r["role"] == role]
        if sel:
            ax.scatter([r["params"] for r in sel], [r["accuracy"] * 100 for r in sel],
                       c=COLORS[role], label=role, s=60, edgecolors="k", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs. model size")
    ax.legend(fontsize=8)
    paths.append(out / "accuracy_vs_params.png")
    fig.savefig(paths[-1], bbox_inches="tight")

    timed = [r for r in rows if r["latency_ms"] is not None]
    if timed:
        fig = Figure(figsize=(max(6.4, 0.6 * len(timed) + 2), 4.8), dpi=110)
        ax = fig.add_subplot()
        labels = [f"{r['label']}\n{r['run_id'][:6]}" for r in timed]
        ax.bar(range(len(timed)), [r["latency_ms"] for r in timed],
               color=[COLORS.get(r["role"], "tab:purple") for r in timed])
        ax.set_xticks(range(len(timed)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("latency per sample (ms, batch 1, 1 thread)")
        ax.set_title("inference latency on this machine")
        paths.append(out / "latency.png")
        fig.savefig(paths[-1], bbox_inches="tight")

    client = tracking.client(uri)
    fig = Figure(figsize=(7.2, 4.8), dpi=110)
    ax = fig.add_subplot()
    drawn = 0
    for r in rows:
        hist = sorted(client.get_metric_history(r["run_id"], "val_accuracy"), key=lambda m: m.step)
        if hist:
            ax.plot([m.step + 1 for m in hist], [m.value * 100 for m in hist],
                    color=COLORS.get(r["role"], "tab:purple"), alpha=0.7, linewidth=1.2,
                    label=f"{r['label']} {r['run_id'][:6]}" if len(rows) <= 10 else None)
            drawn += 1
    if drawn:
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("validation curves")
        if len(rows) <= 10:
            ax.legend(fontsize=6)
        paths.append(out / "val_curves.png")
        fig.savefig(paths[-1], bbox_inches="tight")
    return paths


def run_report(experiment: str, tracking_uri: str | None, out_dir: str | Path) -> dict[str, Any]:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = collect_rows(uri, experiment, Path(tmp))
    if not rows:
        raise ConfigError(f"--experiment: {experiment!r} has no finished run with a test "
                          f"accuracy and weights (run `raykd distill` or `raykd tune` first)")
    groups = group_rows(rows)

    chains = read_chains(uri, experiment)
    text = markdown(experiment, uri, rows, groups) + "\n".join(chain_markdown(chains))
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"rows": rows, "groups": groups}, indent=2,
                                                default=str))
    pngs = plots(rows, uri, out)
    print(text)
    with tracking.tracked_run(uri, experiment, "report", None, {"raykd.role": "report"}) as rid:
        for path in [out / "report.md", out / "report.json", *pngs]:
            tracking.log_artifact(uri, rid, path, "report")
        tracking.log_metrics(uri, rid, {"models": len(rows)})
    return {"report": {"markdown": str(out / "report.md"), "plots": [str(p) for p in pngs],
                       "rows": len(rows)},
            "rows": [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
                     for r in rows],
            "groups": groups, "lineage": chains,
            "mlflow": {"tracking_uri": uri, "run_id": rid, "experiment": experiment}}
