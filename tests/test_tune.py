"""`raykd tune`: a small real search (real Ray, Train V2 trials inside Tune, real MLflow), read
back through the MLflow client; one teacher pass per search; resume after the driver is killed;
the best config round-tripping through `raykd distill`; space validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raykd.cli import main
from raykd.config import ConfigError, load_config

TRAIN_SIZE = 1294  # digits train split (val_fraction 0.1, split_seed 0)
# Test accuracy of each search's best trial (2 epochs of a 32-unit student on digits), floors
# well below what was measured (the same value in each of 3 runs; CPU training is seeded):
SEARCH_ACCURACY_FLOOR = 0.80  # grid over T × random alpha: 0.8719 (T=16, alpha=0.13)
ASHA_ACCURACY_FLOOR = 0.55  # lr 0.01 at the default T and alpha: 0.6602
PBT_ACCURACY_FLOOR = 0.65  # T in {1, 16} at the default alpha, after exploits: 0.8022
SPACE = {"distill.temperature": {"grid": [1, 4, 16]}, "distill.alpha": {"uniform": [0.1, 0.9]}}


def write_config(path: Path, uri: str, experiment: str, **extra) -> Path:
    raw = {
        "teacher": {"name": "mlp", "args": {"hidden_sizes": [128]}, "epochs": 2},
        "student": {"name": "mlp", "args": {"hidden_sizes": [32]}},
        "train": {"epochs": 2, "num_workers": 2, "lr": 0.01},
        "tracking": {"uri": uri, "experiment": experiment},
        "tune": {"space": SPACE, "search": "random", "num_samples": 1,
                 "max_concurrent_trials": 1},
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def trial_runs(client, experiment: str, parent: str | None = None):
    exp = client.get_experiment_by_name(experiment)
    query = "tags.`raykd.role` = 'trial'"
    if parent:
        query += f" and tags.mlflow.parentRunId = '{parent}'"
    return client.search_runs([exp.experiment_id], query) if exp else []


# -- validation (no Ray) ----------------------------------------------------------------------

@pytest.mark.parametrize("key,spec,expect", [
    ("distill.temprature", {"grid": [1, 2]}, "no such config value"),
    ("distill.alpha", {"uniform": [0.1, 1.5]}, "value 1.5 is not allowed"),
    ("distill.alpha", {"normal": [0, 1]}, "unknown distribution 'normal'"),
    ("train.lr", {"loguniform": [0, 0.1]}, "low > 0"),
    ("teacher.lr", {"grid": [0.1]}, "cannot be searched"),
    ("distill.losses.1.weight", {"choice": [0.5, 1]}, "distill.losses is not set"),
])
def test_bad_space_is_one_line_naming_the_key(tmp_path, key, spec, expect, cli_stderr):
    from raykd.schemes.tune import check_tune_config

    cfg_path = write_config(tmp_path / "c.yaml", f"sqlite:///{tmp_path / 'm.db'}", "x",
                            tune__space={key: spec})
    with pytest.raises(ConfigError) as err:
        check_tune_config(load_config(cfg_path))
    assert str(err.value).startswith(f"tune.space.{key}: ") and expect in str(err.value)
    assert "\n" not in str(err.value)
    # Through the CLI: exit 2, one line, nothing started (no MLflow database was created).
    assert main(["tune", "--config", str(cfg_path)]) == 2
    err = cli_stderr()
    assert err.startswith(f"raykd: error: tune.space.{key}: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "m.db").exists()


def test_space_maps_to_ray_tune_domains_and_loss_terms(tmp_path):
    from ray import tune

    from raykd.schemes.tune import check_tune_config
    from raykd.schemes.tune.space import param_space

    cfg = load_config(write_config(
        tmp_path / "c.yaml", "sqlite:///x.db", "x",
        distill__losses=[{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5}],
        tune__search="optuna",
        tune__space={"distill.losses.1.weight": {"choice": [0.5, 1.0]},
                     "distill.losses.1.params.temperature": {"grid": [2, 4]},
                     "train.lr": {"loguniform": [1e-3, 1e-1]}}))
    dims = check_tune_config(cfg)
    space = param_space(dims, "optuna")
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert space["distill.losses.1.params.temperature"].categories == [2, 4]  # optuna: no grid
    grid = param_space(dims, "random")["distill.losses.1.params.temperature"]
    assert grid == {"grid_search": [2, 4]}
    with pytest.raises(ConfigError, match="^tune.space.train.lr: grid search needs"):
        check_tune_config(cfg.with_overrides({"tune.search": "grid"}))


def test_trials_are_sized_to_fit_the_cluster(tmp_path, capsys):
    """Lowering train.cpus_per_worker is said on stderr in one line and returned for the
    summary's `adjusted` (it was silent)."""
    from raykd.schemes.tune import size_trials

    cfg = load_config(write_config(tmp_path / "c.yaml", "sqlite:///x.db", "x"))
    two, adjusted = size_trials(cfg, {"CPU": 2.0})  # the 2-core machine: 0.05 + 2 × 0.975 = 2
    assert two.train.cpus_per_worker == pytest.approx(0.975)
    change = adjusted["train.cpus_per_worker"]
    assert (change["from"], change["to"]) == (1.0, pytest.approx(0.975))
    assert "fit the cluster's 2 CPUs" in change["why"]
    err = capsys.readouterr().err.strip()
    assert err == f"raykd: train.cpus_per_worker lowered from 1 to 0.975 so {change['why']}"
    eight, adjusted = size_trials(cfg, {"CPU": 8.0})
    assert eight.train.cpus_per_worker == 1.0 and adjusted == {}  # never raised
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="^tune.max_concurrent_trials: 40 concurrent"):
        size_trials(cfg.with_overrides({"tune.max_concurrent_trials": 40}), {"CPU": 2.0})


# -- a real search ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    """`raykd tune` over temperature (grid of 3) × alpha (uniform): 3 trials, 2 epochs each,
    the teacher trained once inside the search."""
    root = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = write_config(root / "tune.yaml", uri, "tune-e2e")
    old = os.getcwd()
    os.chdir(root)
    try:
        rc = main(["tune", "--config", str(cfg), "--summary", str(root / "s.json"),
                   "--best-config", str(root / "best.yaml")])
    finally:
        os.chdir(old)
    assert rc == 0
    return json.loads((root / "s.json").read_text()), uri, root


def test_summary_names_best_trial_and_parent(searched):
    summary, uri, root = searched
    assert summary["trials"] == 3
    best = summary["best"]
    assert set(best["config"]) == {"distill.temperature", "distill.alpha"}
    rows = summary["trial_results"]
    assert sorted(r["config"]["distill.temperature"] for r in rows) == [1, 4, 16]
    assert best["metric"] == max(r["metric"] for r in rows)
    assert best["metric_name"] == "val_accuracy" and 0.1 < best["metric"] <= 1.0
    assert best["accuracy"] >= SEARCH_ACCURACY_FLOOR and best["params"] > 0  # its checkpoint
    assert summary["trial_epochs"] == 6  # FIFO: 3 trials × 2 epochs
    assert summary["mlflow"]["run_id"] and summary["best_config"] == str(root / "best.yaml")
    # 1 trial × (2 workers + 0.05) fits the suite's 4 logical CPUs: nothing was lowered
    assert summary["adjusted"] == {} and summary["search"]["cpus_per_worker"] == 1.0


def test_teacher_ran_once_for_the_whole_search(searched):
    summary, _, _ = searched
    teacher = summary["teacher"]
    assert teacher["trained"] is True
    assert teacher["cache"]["status"] == "built"
    # One pass over the transfer set to build the cache, then nothing while 3 trials trained.
    assert teacher["forward_samples"] == TRAIN_SIZE
    assert teacher["forward_samples_during_search"] == 0


def test_mlflow_parent_children_and_best_read_back(searched):
    from mlflow.tracking import MlflowClient

    summary, uri, _ = searched
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["raykd.scheme"] == "tune"
    best = summary["best"]
    for key, value in best["config"].items():
        assert float(parent.data.params[f"best.{key}"]) == pytest.approx(value)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["metric"])
    assert parent.data.metrics["trials"] == 3
    assert parent.data.metrics["teacher_forward_samples_during_search"] == 0
    assert parent.data.tags["raykd.best_run_id"] == best["run_id"]

    children = trial_runs(client, "tune-e2e", parent.info.run_id)
    assert len(children) == 3
    assert len({c.data.tags["raykd.trial_id"] for c in children}) == 3
    by_id = {c.info.run_id: c for c in children}
    for row in summary["trial_results"]:
        child = by_id[row["run_id"]]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["distill.temperature"]) == row["config"][
            "distill.temperature"]
        assert float(child.data.params["distill.alpha"]) == pytest.approx(
            row["config"]["distill.alpha"])
        curve = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in curve) == [0, 1]
        assert curve[-1].value == pytest.approx(row["metric"])
    best_child = by_id[best["run_id"]]
    assert best_child.data.metrics["test_accuracy"] == pytest.approx(best["accuracy"])
    assert "checkpoint/model.safetensors" in {
        a.path for a in client.list_artifacts(best["run_id"], "checkpoint")}
    # The teacher is a child of the search too, trained once.
    teachers = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`raykd.role` = 'teacher'")
    assert len(teachers) == 1
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/val_accuracy_temperature_alpha.png", "plots/learning_curves.png"}
    for path in plots:
        local = client.download_artifacts(parent.info.run_id, path)
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tune/best_config.yaml" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "tune")}


def test_best_config_round_trips_through_distill(searched, ray_session):
    from mlflow.tracking import MlflowClient

    summary, uri, root = searched
    best_path = root / "best.yaml"
    cfg = load_config(best_path)
    assert cfg.tune is None
    assert cfg.distill.temperature == summary["best"]["config"]["distill.temperature"]
    assert cfg.distill.alpha == pytest.approx(summary["best"]["config"]["distill.alpha"])
    assert cfg.teacher.checkpoint == summary["teacher"]["checkpoint"]  # the search's teacher
    assert cfg.teacher.cache_dir == str(root / ".raykd" / "cache")  # ... and its cache
    old = os.getcwd()
    os.chdir(root)
    try:  # as is: no --set
        rc = main(["distill", "--config", str(best_path),
                   "--summary", str(root / "d.json")])
    finally:
        os.chdir(old)
    assert rc == 0
    distilled = json.loads((root / "d.json").read_text())
    assert distilled["teacher"]["cache"]["status"] == "reused"  # same teacher, same cache
    assert distilled["teacher"]["forward_samples"] == 0
    run = MlflowClient(tracking_uri=uri).get_run(distilled["mlflow"]["run_id"])
    assert float(run.data.params["distill.temperature"]) == cfg.distill.temperature

    # The report compares all of it: the search's teacher, its best trial, the student.
    out = root / "report"
    assert main(["report", "--experiment", "tune-e2e", "--tracking-uri", uri,
                 "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    for label in ("| teacher |", "| KD student T=", "| tuned KD student T="):
        assert label in table
    assert table.count("| teacher |") == 1  # the teacher the distill reused is the same file


# -- schedulers -------------------------------------------------------------------------------

def _live_placement_groups() -> set[str]:
    from ray.util import placement_group_table

    return {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}


def test_asha_cuts_the_weak_trial_and_frees_its_workers(searched, ray_session, workdir):
    """ASHA sees every epoch through Ray's TuneReportCallback and stops the hopeless trial
    (lr 1e-6) at its first rung; the stopped trial's Train run ends with it, and Ray Train's
    placement-group cleaner gives its workers' resources back (no group outlives the search)."""
    from mlflow.tracking import MlflowClient

    summary, _, _ = searched
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = write_config(workdir / "tune.yaml", uri, "asha",
                       teacher__checkpoint=summary["teacher"]["checkpoint"],
                       tune__space={"train.lr": {"grid": [0.01, 1e-6]}}, tune__search="grid",
                       tune__scheduler="asha", tune__grace_period=1, tune__reduction_factor=2)
    before = _live_placement_groups()
    assert main(["tune", "--config", str(cfg), "--summary", str(workdir / "s.json")]) == 0
    result = json.loads((workdir / "s.json").read_text())
    by_lr = {r["config"]["train.lr"]: r for r in result["trial_results"]}
    # Tune's view (one report per epoch): the good trial ran to max_t, the hopeless one was cut
    # at the first rung (its workers may have run an epoch further before the cut reached them).
    assert by_lr[0.01]["scheduled_epochs"] == 2
    assert by_lr[1e-6]["scheduled_epochs"] == 1
    assert result["best"]["config"] == {"train.lr": 0.01}
    assert result["best"]["accuracy"] >= ASHA_ACCURACY_FLOOR  # from Train's checkpoint_path
    children = trial_runs(MlflowClient(tracking_uri=uri), "asha", result["mlflow"]["run_id"])
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    deadline = time.monotonic() + 60  # the cleaner polls its controller every second
    while _live_placement_groups() - before and time.monotonic() < deadline:
        time.sleep(1.0)
    assert _live_placement_groups() - before == set()


def test_pbt_exploits_and_restores_checkpoints_tune_holds(searched, ray_session, workdir):
    """Synchronous PBT over two trials, perturbing after every epoch: at epoch 1 PBT pauses
    both, and the lower one exploits the upper one's checkpoint. That needs Tune to hold each
    report's checkpoint (Ray's TuneReportCallback hands Tune only a path, and PBT would skip
    every exploit): both trials then continue at epoch 1 — the upper one from its own checkpoint,
    the lower one from the upper one's — and neither trains an epoch twice."""
    from mlflow.tracking import MlflowClient

    summary, _, _ = searched
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = write_config(workdir / "tune.yaml", uri, "pbt",
                       teacher__checkpoint=summary["teacher"]["checkpoint"],
                       tune__space={"distill.temperature": {"grid": [1, 16]}}, tune__search="grid",
                       tune__scheduler="pbt", tune__synch=True, tune__grace_period=1,
                       tune__max_concurrent_trials=2)
    before = _live_placement_groups()
    assert main(["tune", "--config", str(cfg), "--summary", str(workdir / "s.json")]) == 0
    result = json.loads((workdir / "s.json").read_text())
    assert result["trials"] == 2 and result["failed_trials"] == 0
    client = MlflowClient(tracking_uri=uri)
    children = trial_runs(client, "pbt", result["mlflow"]["run_id"])
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    for child in children:
        run_id = child.info.run_id
        # The values it started with (step 0), and those it continued with from a checkpoint
        # at epoch 1 (its PBT schedule).
        schedule = client.get_metric_history(run_id, "pbt.distill.temperature")
        assert sorted(m.step for m in schedule) == [0, 1]
        # Epoch 1 can be there twice (workers run ahead of PBT's pause), epoch 0 never: both
        # trials continued from a checkpoint instead of starting over.
        steps = [m.step for m in client.get_metric_history(run_id, "val_accuracy")]
        assert steps.count(0) == 1 and max(steps) == 1
    # Tune's own copies of Train's checkpoints, and PBT's record of the exploit.
    folder = Path(result["search"]["dir"])
    kept = sorted(folder.glob("tune_trial_*/checkpoint_*"))
    assert kept and all((c / "model.safetensors").is_file() and (c / "state.json").is_file()
                        for c in kept)
    exploits = (folder / "pbt_global.txt").read_text().splitlines()
    assert len(exploits) >= 1
    assert result["best"]["accuracy"] >= PBT_ACCURACY_FLOOR  # from Tune's checkpoint
    # Paused trials' Train runs ended with their trial actors; nothing holds their workers.
    deadline = time.monotonic() + 60
    while _live_placement_groups() - before and time.monotonic() < deadline:
        time.sleep(1.0)
    assert _live_placement_groups() - before == set()


# -- resume -----------------------------------------------------------------------------------

def test_resume_after_killed_driver_skips_finished_trials(searched, ray_session, workdir):
    """Kill the driver (SIGKILL) once a trial has finished, then `raykd tune --resume`."""
    from mlflow.tracking import MlflowClient

    summary, _, _ = searched
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = write_config(workdir / "tune.yaml", uri, "resume",
                       teacher__checkpoint=summary["teacher"]["checkpoint"],
                       tune__name="resume-test")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "PYTHONUNBUFFERED": "1"}
    log = (workdir / "driver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "raykd.cli", "tune", "--config", str(cfg)],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = MlflowClient(tracking_uri=uri)
    finished = []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1.0)
            if not (workdir / "mlflow.db").exists():
                continue
            finished = [r for r in trial_runs(client, "resume") if r.info.status == "FINISHED"]
            if finished:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert finished, (workdir / "driver.log").read_text()[-3000:]
    before = {r.info.run_id: (r.info.end_time, [(m.step, m.timestamp, m.value) for m in
                                                 client.get_metric_history(r.info.run_id,
                                                                           "val_accuracy")])
              for r in trial_runs(client, "resume") if r.info.status == "FINISHED"}
    # A precondition of the scenario: trials run one at a time (max_concurrent_trials=1), each a
    # full 2-worker fit, and the driver is killed at the first FINISHED trial, so 1 or 2 of the
    # 3 are done. Were all 3 done, --resume below would have nothing to skip and the test would
    # not test resuming; it fails here instead.
    assert 1 <= len(before) < 3  # interrupted mid-search

    rc = main(["tune", "--config", str(cfg), "--resume", "--summary", str(workdir / "s.json")])
    assert rc == 0, (workdir / "driver.log").read_text()[-3000:]
    resumed = json.loads((workdir / "s.json").read_text())
    assert resumed["search"]["resumed"] is True
    assert resumed["trials"] == 3
    parents = client.search_runs([client.get_experiment_by_name("resume").experiment_id],
                                 "tags.`raykd.scheme` = 'tune'")
    assert [p.info.run_id for p in parents] == [resumed["mlflow"]["run_id"]]  # same parent
    assert parents[0].info.status == "FINISHED"
    children = trial_runs(client, "resume", resumed["mlflow"]["run_id"])
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["raykd.trial_id"] for c in children} == {
        r["trial_id"] for r in resumed["trial_results"]}
    for run_id, (end_time, curve) in before.items():  # finished trials were not re-run
        again = client.get_run(run_id)
        assert again.info.end_time == end_time
        assert [(m.step, m.timestamp, m.value) for m in
                client.get_metric_history(run_id, "val_accuracy")] == curve
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert sorted(set(steps)) == [0, 1]
    # The given teacher's cache, built by the killed driver, served the resumed search as is.
    assert resumed["teacher"]["cache"]["status"] == "reused"
    assert resumed["teacher"]["forward_samples"] == 0


def test_resume_without_a_search_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", f"sqlite:///{tmp_path / 'm.db'}", "x")
    assert main(["tune", "--config", str(cfg), "--resume"]) == 2
    assert "--resume: no search for this config" in capsys.readouterr().err
