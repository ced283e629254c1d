"""`raykd report` over a real MLflow experiment: runs laid out the way `raykd distill` logs them
(parent with the config, teacher/student/baseline children with test accuracy and weights), with
real raykd checkpoints; no Ray needed. (tests/test_tune.py reports on a real search + distill.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raykd import tracking
from raykd.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _weights(tmp: Path, name: str, hidden: list[int]) -> tuple[Path, int]:
    import torch

    from raykd.config import DataConfig, ModelConfig
    from raykd.data import dataset_info
    from raykd.models import build_model, count_params
    from raykd.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    info = dataset_info(DataConfig())
    spec = {"name": "mlp", "args": {"hidden_sizes": hidden}}
    model = build_model(ModelConfig(**spec), info)
    return save_checkpoint(model, spec, info, tmp / name), count_params(model)


def _distill_run(uri: str, exp: str, seed: int, teacher_ckpt: str | None, student: Path,
                 baseline: Path, accs: tuple[float, float]) -> str:
    parent = tracking.start_run(uri, exp, "distill", None, {"raykd.scheme": "offline"})
    tracking.log_params(uri, parent, {"distill.temperature": 4.0, "distill.alpha": 0.5,
                                      "train.seed": seed, "teacher.checkpoint": teacher_ckpt})
    if teacher_ckpt:
        tracking.log_metrics(uri, parent, {"teacher_test_accuracy": 0.97})
    for role, path, acc in (("student", student, accs[0]), ("baseline", baseline, accs[1])):
        run = tracking.start_run(uri, exp, role, parent, {"raykd.role": role})
        for step, v in enumerate((0.5, 0.8, acc)):
            tracking.log_metrics(uri, run, {"val_accuracy": v}, step=step)
        tracking.log_metrics(uri, run, {"test_accuracy": acc})
        tracking.log_artifact(uri, run, path, "checkpoint")
        tracking.end_run(uri, run)
    tracking.end_run(uri, parent)
    return parent


@pytest.fixture()
def experiment(workdir, mlflow_uri):
    exp = "report-test"
    teacher, t_params = _weights(workdir, "teacher", [256, 256])
    student, s_params = _weights(workdir, "student", [32])
    baseline, _ = _weights(workdir, "baseline", [32])
    # A teacher trained inside a distill run: its own run with its weights under teacher/.
    t_run = tracking.start_run(mlflow_uri, exp, "teacher", None, {"raykd.role": "teacher"})
    tracking.log_metrics(mlflow_uri, t_run, {"test_accuracy": 0.97})
    tracking.log_artifact(mlflow_uri, t_run, teacher, "teacher")
    tracking.end_run(mlflow_uri, t_run)
    # Two seeds distilled from that teacher given as a checkpoint (same file → one teacher row).
    _distill_run(mlflow_uri, exp, 0, str(teacher), student, baseline, (0.91, 0.89))
    _distill_run(mlflow_uri, exp, 1, str(teacher), student, baseline, (0.93, 0.88))
    # Unfinished runs are left out.
    running = tracking.start_run(mlflow_uri, exp, "student", None, {"raykd.role": "student"})
    tracking.log_metrics(mlflow_uri, running, {"test_accuracy": 0.1})
    tracking.log_artifact(mlflow_uri, running, student, "checkpoint")
    return exp, mlflow_uri, t_params, s_params


def test_report_table_plots_and_mlflow_run(experiment, workdir):
    from mlflow.tracking import MlflowClient

    exp, uri, t_params, s_params = experiment
    out = workdir / "rep"
    assert main(["report", "--experiment", exp, "--tracking-uri", uri, "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    rows = data["rows"]
    assert [r["role"] for r in rows] == ["teacher", "baseline", "baseline", "student", "student"]
    teacher = rows[0]
    assert teacher["params"] == t_params and teacher["accuracy"] == 0.97
    assert all(r["params"] == s_params for r in rows[1:])
    assert teacher["size_bytes"] > 10 * rows[-1]["size_bytes"]  # weights on disk
    assert all(r["latency_ms"] and r["latency_ms"] > 0 for r in rows)
    assert sorted(r["accuracy"] for r in rows if r["role"] == "student") == [0.91, 0.93]
    assert 0.1 not in [r["accuracy"] for r in rows]  # the RUNNING run

    groups = {g["label"]: g for g in data["groups"]}
    student = groups["KD student T=4.0 α=0.5"]
    assert student["n"] == 2 and student["mean"] == pytest.approx(0.92)
    assert student["std"] == pytest.approx(0.01414, abs=1e-4)

    table = (out / "report.md").read_text()
    assert "| model | accuracy (test) | params | size on disk | latency / sample |" in table
    assert "| teacher | 97.00% |" in table and "## Over seeds" in table
    for png in ("accuracy_vs_params.png", "latency.png", "val_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG

    client = MlflowClient(tracking_uri=uri)
    reports = client.search_runs([client.get_experiment_by_name(exp).experiment_id],
                                 "tags.`raykd.role` = 'report'")
    assert len(reports) == 1
    logged = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert {"report/report.md", "report/latency.png"} <= logged

    # A second report does not count the first report's run as a model.
    assert main(["report", "--experiment", exp, "--tracking-uri", uri,
                 "--out", str(workdir / "rep2")]) == 0
    assert len(json.loads((workdir / "rep2" / "report.json").read_text())["rows"]) == 5


def test_report_unknown_experiment_is_one_line(workdir, mlflow_uri, capsys):
    tracking.experiment_id(mlflow_uri, "exists")
    assert main(["report", "--experiment", "nope", "--tracking-uri", mlflow_uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own log lines
    assert err.startswith("raykd: error: --experiment: no MLflow experiment named 'nope'")
    assert main(["report", "--experiment", "exists", "--tracking-uri", mlflow_uri]) == 2
    assert "has no finished run" in capsys.readouterr().err


def test_latency_is_per_sample_and_positive():
    import torch

    from raykd.report import measure_latency

    model = torch.nn.Linear(64, 10)
    t = measure_latency(model, torch.zeros(1, 64), repeats=3, min_seconds=0.02)
    assert 0 < t < 0.1
