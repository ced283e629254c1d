"""End to end: `raykd distill --baseline` on digits with real Ray (2 workers) and real MLflow,
then the cache reuse / invalidation the teacher actor promises."""

from __future__ import annotations

import json

import pytest

from raykd.cli import main

# The embedded default as a user runs it (10% labelled, README command 1), shortened: a teacher of
# 20 epochs over the 129 labelled images (40 steps), a 2-epoch student over all 1,294 (22 steps).
FAST = ["--set", "train.epochs=2", "--set", "teacher.epochs=20", "--set", "train.num_workers=2"]


@pytest.fixture(scope="module")
def distilled(ray_session, tmp_path_factory):
    """One real distillation shared by the checks below (fits are the expensive unit), run as a
    user runs it: `raykd distill` in its own process, its console going to a file (not a
    terminal). It joins the session's Ray cluster rather than starting one."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("distill")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with (root / "console.txt").open("w") as console:
        rc = subprocess.run(
            [sys.executable, "-m", "raykd.cli", "distill", "--baseline", *FAST,
             "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=e2e",
             "--register", "digits-student", "--summary", str(root / "s.json")],
            cwd=root, env=env, stdout=console, stderr=subprocess.STDOUT, timeout=900).returncode
    assert rc == 0, (root / "console.txt").read_text()[-3000:]
    summary = json.loads((root / "s.json").read_text())
    return rc, summary, uri, root


def test_distill_summary_has_every_part(distilled):
    rc, summary, uri, _ = distilled
    assert rc == 0
    # Floors under what this shortened run measures, the same on every run (2026-12-07: teacher
    # 87.19% from 129 labels, student 53.76% (T=4, alpha 0.9 learns slowly in 2 epochs),
    # baseline 45.13% after its 22 steps on 129 images).
    floors = {"teacher": 0.80, "student": 0.45, "baseline": 0.38}
    for part, floor in floors.items():
        assert summary[part]["accuracy"] > floor, (part, summary[part]["accuracy"])
        assert summary[part]["params"] > 0
    # The default teacher (512-512 MLP) is far bigger than the 32-unit student.
    assert summary["teacher"]["params"] > 10 * summary["student"]["params"]
    assert summary["student"]["params"] == summary["baseline"]["params"]
    assert summary["mlflow"]["tracking_uri"] == uri
    assert summary["teacher"]["cache"]["status"] == "built"


def test_default_scenario_labelled_part_and_step_budget(distilled):
    """README command 1's scenario: the teacher and the baseline learn the 129 labelled images,
    the student all 1,294 train images (the pool from the teacher's soft labels), and the
    baseline's epochs are scaled so its optimizer steps reach the student's."""
    _, summary, _, _ = distilled
    assert summary["teacher"]["transfer_size"] == 129
    assert summary["student"]["transfer"] == {"labelled": 129, "pool": 1165,
                                              "pseudo_labelled": 1165}
    assert summary["baseline"]["transfer_size"] == 129
    assert summary["student"]["steps"] == 2 * 11  # 647 images per worker, batches of 64
    assert summary["baseline"]["epochs"] == 11 and summary["baseline"]["steps"] == 11 * 2


def test_mlflow_run_params_and_metrics_read_back(distilled):
    from mlflow.tracking import MlflowClient

    _, summary, uri, _ = distilled
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["distill.temperature"] == "4.0"
    assert parent.data.params["train.num_workers"] == "2"
    assert parent.data.params["student.args.hidden_sizes"] == "[32]"
    assert parent.data.metrics["student_test_accuracy"] == pytest.approx(
        summary["student"]["accuracy"])
    assert parent.data.metrics["baseline_test_accuracy"] == pytest.approx(
        summary["baseline"]["accuracy"])
    student = client.get_run(summary["student"]["run_id"])
    assert student.data.tags["mlflow.parentRunId"] == parent.info.run_id
    curve = client.get_metric_history(student.info.run_id, "val_accuracy")
    assert [m.step for m in curve] == [0, 1]
    losses = client.get_metric_history(student.info.run_id, "loss_kd")
    assert len(losses) == 2 and all(m.value >= 0 for m in losses)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert "config/config.resolved.yaml" in artifacts
    student_files = {a.path for a in client.list_artifacts(student.info.run_id)}
    assert "checkpoint" in student_files


def test_console_is_short_and_has_no_ray_report_dumps(distilled):
    _, _, _, root = distilled
    text = (root / "console.txt").read_text()
    assert "TrainingReport(" not in text  # Ray Train's per-report INFO dump
    assert "Traceback" not in text
    assert "uv export" not in text and "Creating initial MLflow database" not in text
    for role, epochs in (("teacher", 20), ("student", 2), ("baseline", 11)):
        assert f"[{role}] epoch {epochs}/{epochs} loss" in text  # progress, one line per epoch
    assert len(text.splitlines()) <= 40, text


def test_params_apply_and_models_are_named_by_role(distilled):
    import mlflow
    from mlflow.tracking import MlflowClient

    _, summary, uri, _ = distilled
    client = MlflowClient(tracking_uri=uri)
    params = client.get_run(summary["mlflow"]["run_id"]).data.params
    assert params["tracking.uri"] == uri  # the resolved URI, not None
    for absent in ("data.num_samples", "data.image_size", "teacher.views", "tune"):
        assert absent not in params, absent
    assert params["train.keep_checkpoint"] == "best"
    run = client.get_run(summary["student"]["run_id"])
    mlflow.set_tracking_uri(uri)
    names = {m.source_run_id: m.name for m in mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list")}
    assert names[summary["student"]["run_id"]] == "student"
    assert names[summary["baseline"]["run_id"]] == "baseline"


def test_each_fit_keeps_its_best_validation_epoch(distilled):
    _, summary, _, _ = distilled
    history = summary["student"]["history"]
    key = [(h["val_accuracy"], -h["val_loss"]) for h in history]
    assert summary["student"]["best_epoch"] == key.index(max(key))
    assert summary["student"]["val_accuracy"] == max(key)[0]
    for part in ("teacher", "student", "baseline"):
        last = summary[part]["epochs"] - 1
        assert summary[part]["checkpoint_epochs"] == [last]  # default cadence: the last epoch


def test_teacher_checkpoint_is_safetensors_the_loader_rebuilds(distilled):
    """The teacher the run trained is written as safetensors (no pickle) and describes its own
    model: what `teacher.checkpoint` reads back."""
    from pathlib import Path

    import torch

    from raykd.config import load_config
    from raykd.train.checkpoint import read_checkpoint

    _, summary, _, _ = distilled
    path = Path(summary["teacher"]["checkpoint"])
    assert path.suffix == ".safetensors" and path.read_bytes()[8:9] == b"{"  # JSON header
    state, spec, info = read_checkpoint(path)
    teacher = load_config(None, {}).teacher
    assert spec == {"name": teacher.name, "args": teacher.args}
    assert info.num_classes == 10 and all(isinstance(t, torch.Tensor) for t in state.values())


class RunsCodeWhenUnpickled:
    """A pickled object whose loading calls os.mkdir(marker): what a malicious .pt can hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_a_pickled_teacher_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch,
                                                                    cli_stderr):
    """`.pt` teacher checkpoints go through torch.load(weights_only=True): a plain state dict
    loads; one carrying any other object is refused — by the loader the teacher actor uses and
    by `raykd distill`'s check before Ray — and its code never runs."""
    import pickle

    import torch

    from raykd.config import load_config
    from raykd.data import dataset_info
    from raykd.models import build_model
    from raykd.teacher.loading import load_teacher_models

    cfg = load_config(None, {})
    info = dataset_info(cfg.data)
    state = build_model(cfg.teacher, info, field="teacher").state_dict()
    plain, evil = tmp_path / "plain.pt", tmp_path / "evil.pt"
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": state}, plain)
    torch.save({"state_dict": state, "extra": RunsCodeWhenUnpickled(str(marker))}, evil)
    [model] = load_teacher_models([str(plain)], cfg, info, "")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_teacher_models([str(evil)], cfg, info, "")
    assert not marker.exists()
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--set", f"teacher.checkpoint={evil}"]) == 2
    assert cli_stderr().startswith(f"raykd: error: teacher.checkpoint: cannot read {evil} "
                                   f"(UnpicklingError")
    assert not marker.exists() and not (tmp_path / "mlflow.db").exists()


def test_second_run_reuses_cache_without_teacher_forward(distilled, ray_session,
                                                        embedded_default):
    """A user's second run of the default (in this process, the embedded config)."""
    import os

    _, summary, uri, root = distilled
    ckpt = summary["teacher"]["checkpoint"]
    old = os.getcwd()
    os.chdir(root)
    try:
        rc = main(["distill", "--set", "train.epochs=1", "--set", f"teacher.checkpoint={ckpt}",
                   "--set", f"tracking.uri={uri}", "--summary", str(root / "s2.json")])
        second = json.loads((root / "s2.json").read_text())
    finally:
        os.chdir(old)
    assert rc == 0
    assert second["teacher"]["cache"]["status"] == "reused"
    assert second["teacher"]["forward_samples"] == 0  # the teacher never ran


def test_student_logged_as_mlflow_model_that_predicts(distilled):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    _, summary, uri, _ = distilled
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["student"]["run_id"])
    mlflow.set_tracking_uri(uri)
    models = [m for m in mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list")
        if m.source_run_id == run.info.run_id]
    assert len(models) == 1, "the student is logged as an MLflow model"
    model = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    logits = model(torch.zeros(3, 1, 8, 8))
    assert tuple(logits.shape) == (3, 10)


def test_register_makes_a_tagged_model_version_that_loads(distilled):
    """--register NAME (issue #18): the student is version 1 of NAME, tagged with its teacher
    run, the cache key and the scheme, and models:/NAME/1 loads and predicts."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    _, summary, uri, _ = distilled
    reg = summary["registered"]
    assert (reg["name"], reg["version"]) == ("digits-student", 1)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("digits-student", "1")
    assert version.run_id == summary["student"]["run_id"]
    assert version.tags["raykd.teacher_run_id"] == summary["teacher"]["run_id"]
    assert version.tags["raykd.cache_key"] == summary["teacher"]["cache"]["key"]
    assert version.tags["raykd.scheme"] == "offline"
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(reg["model_uri"])
    assert tuple(model(torch.zeros(3, 1, 8, 8)).shape) == (3, 10)
