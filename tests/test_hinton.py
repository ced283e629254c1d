"""The Hinton MNIST job (jobs/hinton_mnist.py = `raykd hinton-mnist`) end to end on a tiny MNIST
written here in the real IDX format — never the shared copy — with real Ray and real MLflow.

One job run (teacher, baseline, distilled, omitted-3 and only-7-8 fits) is shared by the checks:
the table's structure, that the omitted class never reaches the transfer set, that the bias shift
is chosen on the validation split, the MLflow run tree, and teacher reuse.
"""

from __future__ import annotations

import json
import os
import runpy
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.cli import main
from raykd.schemes import hinton
from raykd.schemes.hinton.report import SEED_KEYS, markdown_table, table_of
from raykd.schemes.hinton.bias_shift import (accuracy_by_shift, apply_bias_shift, best_shift,
                                             choose_bias_shift, error_counts, shift_grid)

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "hinton_mnist.py"
CONFIG = REPO / "configs" / "mnist_hinton_distill.yaml"
EXPERIMENT = "hinton-test"
# Tiny nets and a few epochs: each fit's cost is Ray Train's start-up, not the epochs.
FAST = ["--set", "teacher.epochs=3", "--set", "teacher.lr=0.01", "--set", "train.epochs=3",
        "--set", "train.lr=0.01", "--set", "train.batch_size=32",
        "--set", "teacher.args.hidden_sizes=[64,64]", "--set", "student.args.hidden_sizes=[32,32]",
        "--set", f"tracking.experiment={EXPERIMENT}"]
SEEDS = ["--set", "hinton.seeds=[0,1]"]  # the table twice: baseline and distilled per seed


# ---------------------------------------------------------------- a tiny MNIST in the IDX format

def write_idx(path: Path, array: np.ndarray) -> None:
    """Big-endian magic (0x0803: 3-d uint8 images, 0x0801: 1-d uint8 labels), the dimensions as
    big-endian uint32, then the raw bytes — what torchvision's MNIST reader expects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def digit_like(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 images a small MLP can learn: a bright bar whose place encodes the class, jittered by
    a pixel, over faint noise."""
    images = rng.integers(0, 40, (len(labels), 28, 28))
    for i, c in enumerate(labels):
        r = 3 + (c // 5) * 12 + rng.integers(-1, 2)
        col = 1 + (c % 5) * 5 + rng.integers(-1, 2)
        images[i, r:r + 8, col:col + 4] = rng.integers(180, 256, (8, 4))
    return images.astype(np.uint8)


def write_tiny_mnist(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", digit_like(labels, rng))
        write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="module")
def job(ray_session, mnist_root, tmp_path_factory, monkeypatch_module):
    """One run of jobs/hinton_mnist.py, in-process (so it joins the test session's Ray)."""
    root = tmp_path_factory.mktemp("hinton_job")
    monkeypatch_module.chdir(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    argv = ["--data-root", str(mnist_root), *FAST, *SEEDS, "--set", f"tracking.uri={uri}",
            "--summary", str(root / "summary.json"), "--markdown", str(root / "table.md")]
    monkeypatch_module.setattr(sys, "argv", [str(JOB), *argv])
    # `python jobs/hinton_mnist.py` puts jobs/ first on sys.path, where the job's _entry is;
    # runpy does not.
    monkeypatch_module.syspath_prepend(str(JOB.parent))
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(JOB), run_name="__main__")
    plan = hinton.load_plan(CONFIG, _pairs(FAST + SEEDS) + [f"tracking.uri={uri}"],
                            str(mnist_root))
    summary = json.loads((root / "summary.json").read_text())
    return {"rc": stopped.value.code, "summary": summary, "uri": uri, "root": root,
            "plan": plan, "markdown": (root / "table.md").read_text()}


def _pairs(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--set"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# ---------------------------------------------------------------- the table

def test_job_writes_the_comparison_table(job):
    assert job["rc"] == 0
    s = job["summary"]
    test_size = 100
    # Ceilings over the errors this job measures on the 100 tiny test images (chance: 90), the
    # same in two runs (the job script and this test, 2026-12-07, 2 cores): teacher 0, baseline
    # 0 and 0, distilled 10 and 2 (seeds 0 and 1).
    ceilings = {"teacher": 5, "baseline": 5, "distilled": 20}
    for part in ("teacher", "baseline", "distilled"):
        assert 0 <= s[part]["errors"] <= ceilings[part], (part, s[part]["errors"])
        assert s[part]["test_size"] == test_size
        assert s[part]["accuracy"] == pytest.approx(1 - s[part]["errors"] / test_size)
    assert s["teacher"]["trained"] is True and s["teacher"]["params"] > s["distilled"]["params"]
    assert s["baseline"]["params"] == s["distilled"]["params"]
    # one baseline and one distilled student per seed; the table holds their means
    runs = s["seed_runs"]
    assert [r["seed"] for r in runs] == [0, 1] and s["baseline"] == runs[0]["baseline"]
    base = [r["baseline"]["errors"] for r in runs]
    dist = [r["distilled"]["errors"] for r in runs]
    assert max(base) <= ceilings["baseline"] and max(dist) <= ceilings["distilled"], (base, dist)
    t = s["table"]
    assert t["teacher_errors"] == s["teacher"]["errors"] and t["seeds"] == [0, 1]
    assert (t["baseline_errors_per_seed"], t["distilled_errors_per_seed"]) == (base, dist)
    assert t["baseline_errors"] == pytest.approx(sum(base) / 2, abs=0.05)
    assert t["distilled_errors"] == pytest.approx(sum(dist) / 2, abs=0.05)
    assert t["gap_closed"] == hinton.gap_closed(t["teacher_errors"], t["baseline_errors"],
                                                t["distilled_errors"])
    assert t["gap_closed_per_seed"] == [hinton.gap_closed(t["teacher_errors"], b, d)
                                        for b, d in zip(base, dist, strict=True)]
    # the seed reached the workers: same recipe, different initial weights
    from safetensors.torch import load_file

    w0, w1 = (load_file(str(Path(r["baseline"]["checkpoint"]))) for r in runs)
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)
    # the benchmark's flat record: every key, from the same numbers
    bench = s["benchmark"]
    assert set(bench) == set(hinton.BENCHMARK_KEYS + SEED_KEYS)
    assert bench == hinton.benchmark_record(s)
    assert bench["omitted_errors_before"] == s["omitted"]["errors_before"]
    assert bench["omitted_class_errors_after"] == s["omitted"]["class_errors_after"]["3"]
    assert bench["two_class_error_before"] == pytest.approx(s["two_class"]["errors_before"] / 100)
    assert all(bench[k] is not None for k in hinton.BENCHMARK_KEYS if k != "gap_closed")
    assert bench["baseline_errors_per_seed"] == base and bench["seeds"] == [0, 1]
    # the markdown table, written with --markdown, next to the paper's numbers
    md = job["markdown"]
    assert md == s["markdown"]
    assert md.startswith("| | Hinton et al. 2015 | raykd |")
    assert "| 146 |" in md and "| 74 |" in md and "206 → 109" in md and "47.3% → 13.2%" in md
    assert f"{s['omitted']['errors_before']} → {s['omitted']['errors_after']}" in md
    assert f"mean of 2 seeds | 146 | {t['baseline_errors']} (seeds: {base[0]}, {base[1]}) |" in md
    assert s["settings"]["temperature"] == 20.0 and s["settings"]["bias_split"] == "val"
    # the paper's students: un-augmented inputs, labels from the plain cache
    assert s["settings"]["distilled"]["jitter"] == s["settings"]["baseline"]["jitter"] == 0
    assert (s["settings"]["distilled"]["teacher_mode"], s["settings"]["distilled"]["views"]) == (
        "cached", 1)
    assert "Distilled 784-800-800-10, T=20.0: test errors" in md


def test_benchmark_record_of_full_and_partial_jobs(job):
    """benchmarks/hinton_mnist.py's flat record: every field of a full job, and None (not a
    KeyError after the run) for experiments a `hinton.experiments` subset left out."""
    import copy
    import importlib.util

    from raykd.schemes.hinton.report import BENCHMARK_KEYS, benchmark_record

    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "hinton_mnist.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    full = bench.flat_record(job["summary"], 12.3, [], "/data")
    assert all(full[k] is not None for k in BENCHMARK_KEYS if k != "gap_closed")  # tiny nets
    assert full["omitted_class"] == 3 and full["two_classes"] == [7, 8]
    assert full["shift_split"] == "val" and full["wall_seconds"] == 12.3
    table_only = copy.deepcopy(job["summary"])
    del table_only["omitted"], table_only["two_class"]
    table_only["experiments"] = ["table"]
    table_only["benchmark"] = benchmark_record(table_only)
    rec = bench.flat_record(table_only, None, ["hinton.experiments=[table]"], "/data")
    assert rec["distilled_errors"] == full["distilled_errors"]
    assert rec["omitted_errors_before"] is None and rec["omitted_class"] is None
    assert rec["two_classes"] is None and rec["shift_split"] is None
    assert rec["wall_seconds"] is None and rec["experiments"] == ["table"]


def test_teacher_config_is_hintons_teacher(job, mnist_root):
    s = job["summary"]["settings"]["teacher"]
    assert s["jitter"] == 2
    assert s["model"]["args"]["dropout"] == 0.2 and s["model"]["args"]["input_dropout"] == 0.0
    plan = hinton.load_plan(CONFIG, [], str(mnist_root))  # the shipped configs, untouched
    assert plan.teacher.teacher.args["hidden_sizes"] == [1200, 1200]
    assert plan.baseline.student.args == {"hidden_sizes": [800, 800]}
    assert plan.distill.student.args == {"hidden_sizes": [800, 800]}
    assert plan.distill.distill.temperature == 20.0


# ---------------------------------------------------------------- the transfer sets

def test_omitted_class_is_absent_from_the_transfer_set(job):
    from raykd.data import build_dataset

    s, plan = job["summary"], job["plan"]
    train = build_dataset(plan.distill.data, "train")
    labels = train.labels
    assert s["distilled"]["transfer_size"] == len(train)
    assert s["omitted"]["transfer_size"] == int((labels != 3).sum()) < len(train)
    assert s["two_class"]["transfer_size"] == int(((labels == 7) | (labels == 8)).sum())
    # what the loop iterates over: the same filter, with no 3 left / only 7s and 8s
    om = plan.omitted().distill
    kept = train.subset_indices(om.include_classes, om.exclude_classes)
    assert len(kept) == s["omitted"]["transfer_size"] and not (labels[kept] == 3).any()
    tc = plan.two_class().distill
    kept = train.subset_indices(tc.include_classes, tc.exclude_classes)
    assert set(labels[kept].tolist()) == {7, 8}
    # and the omitted run was configured so in MLflow
    from mlflow.tracking import MlflowClient

    run = MlflowClient(job["uri"]).get_run(s["omitted"]["run_id"])
    assert run.data.params["distill.exclude_classes"] == "[3]"


# ---------------------------------------------------------------- bias shifts

def test_bias_shift_is_chosen_on_validation_data(job):
    from raykd.data import build_dataset, dataset_info
    from raykd.train.checkpoint import load_model

    s, plan = job["summary"], job["plan"]
    val = build_dataset(plan.distill.data, "val")
    test = build_dataset(plan.distill.data, "test")
    for part, cfg in (("omitted", plan.omitted()), ("two_class", plan.two_class())):
        shift = s[part]["shift"]
        assert shift["split"] == "val"
        assert shift["dataset_checksum"] == val.checksum() != test.checksum()
        assert shift["grid"] == [-15.0, 15.0, 0.1]
        # recompute from the logged checkpoint: on val it gives the recorded δ ...
        model = load_model(s[part]["checkpoint"], cfg.student, dataset_info(cfg.data), "student")
        again = choose_bias_shift(model, s[part]["classes"], val, "val", tuple(shift["grid"]))
        assert again.delta == shift["delta"]
        assert again.accuracy_after >= again.accuracy_before
        # ... and the reported test errors are those of that δ
        assert error_counts(model, test)["errors"] == s[part]["errors_before"]
        apply_bias_shift(model, s[part]["classes"], shift["delta"])
        assert error_counts(model, test)["errors"] == s[part]["errors_after"]


def _logit_dataset(rows: list[list[float]], labels: list[int]):
    from raykd.data import IndexedDataset

    x = torch.tensor(rows, dtype=torch.float32)[:, None, None, :]
    return IndexedDataset(x, torch.tensor(labels))


class LogitsAreInputs(torch.nn.Module):
    """flatten → identity ``head``: the logits are the inputs, so datasets spell out logits."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.head = torch.nn.Linear(classes, classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(classes))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x.flatten(1))


def test_choose_bias_shift_uses_only_the_split_it_is_given():
    # class 3's logit is too low by 2..5 on "val" but by 6..9 on "test": the two optima differ
    val = _logit_dataset([[2, 0, 0, 0]] * 3 + [[5, 0, 0, 0]] * 3, [3] * 3 + [0] * 3)
    test = _logit_dataset([[6, 0, 0, 0]] * 3 + [[9, 0, 0, 0]] * 3, [3] * 3 + [0] * 3)
    model = LogitsAreInputs()
    on_val = choose_bias_shift(model, [3], val, "val", (-10, 10, 0.5))
    on_test = choose_bias_shift(model, [3], test, "test", (-10, 10, 0.5))
    assert 2 < on_val.delta < 5 and 6 < on_test.delta < 9
    assert on_val.split == "val" and on_val.dataset_checksum == val.checksum()
    assert on_val.accuracy_before == 0.5 and on_val.accuracy_after == 1.0
    assert error_counts(model, test, [3])["class_errors"] == {3: 3}
    apply_bias_shift(model, [3], on_val.delta)  # val's δ is not enough for test's 3s
    assert error_counts(model, test, [3]) == {"errors": 3, "total": 6, "class_errors": {3: 3},
                                              "class_sizes": {3: 3}}
    assert model.head.bias.tolist() == [0, 0, 0, on_val.delta]


def test_bias_grid_and_plateau_middle():
    grid = shift_grid(-1, 1, 0.1)
    assert len(grid) == 21 and grid[0] == -1 and grid[-1] == 1 and 0.0 in grid.tolist()
    logits = torch.tensor([[0.95, 0.0], [0.0, 0.0]])
    acc = accuracy_by_shift(logits, torch.tensor([0, 1]), [1], grid)
    assert acc.max() == 1.0
    delta, tied = best_shift(logits, torch.tensor([0, 1]), [1], grid)
    assert tied == 9  # 0.1 .. 0.9 all separate the two rows
    assert delta == pytest.approx(0.5)  # the middle of that plateau
    with pytest.raises(ValueError):
        shift_grid(1, -1, 0.1)


# ---------------------------------------------------------------- MLflow and teacher reuse

def test_one_mlflow_parent_with_every_run_nested(job):
    from mlflow.tracking import MlflowClient

    s, uri = job["summary"], job["uri"]
    client = MlflowClient(uri)
    parent = client.get_run(s["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "hinton-mnist"
    exp = client.get_experiment_by_name(EXPERIMENT)
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {r.info.run_name for r in children}
    assert names == {"teacher", "baseline-seed0", "baseline-seed1", "distilled-seed0",
                     "distilled-seed1", "omitted-3", "only-7-8"}
    assert all(r.info.status == "FINISHED" for r in children)
    seeds = {r.info.run_name: r.data.params["train.seed"] for r in children}
    assert (seeds["baseline-seed1"], seeds["distilled-seed1"], seeds["omitted-3"]) == (
        "1", "1", "0")
    per_seed = client.get_metric_history(parent.info.run_id, "distilled_errors_per_seed")
    assert [(m.step, m.value) for m in per_seed] == [
        (i, r["distilled"]["errors"]) for i, r in enumerate(s["seed_runs"])]
    for key in ("teacher_errors", "distilled_errors", "omitted_errors_after",
                "two_class_error_after"):
        assert parent.data.metrics[key] == pytest.approx(s["benchmark"][key])
    assert parent.data.params["distill.temperature"] == "20.0"
    assert parent.data.params["hinton.omit_class"] == "3"
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"hinton_mnist.md", "summary.json", "config"} <= files
    configs = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert {"config/teacher.resolved.yaml", "config/baseline.resolved.yaml",
            "config/mnist_hinton_teacher.yaml"} <= configs
    omitted = client.get_run(s["omitted"]["run_id"])
    assert omitted.data.tags["raykd.hinton.shift_split"] == "val"
    assert omitted.data.metrics["shift_delta"] == pytest.approx(s["omitted"]["shift"]["delta"])
    assert "bias_shifted" in {a.path for a in client.list_artifacts(omitted.info.run_id)}


def test_second_job_reuses_the_teacher(job):
    from raykd import tracking

    s, uri, plan = job["summary"], job["uri"], job["plan"]
    key = hinton.teacher_key(plan.teacher)
    found = hinton.find_reusable_teacher(uri, EXPERIMENT, key)
    assert found is not None and found["run_id"] == s["teacher"]["run_id"]
    from raykd.schemes.lineage import Lineage

    with tracking.tracked_run(uri, EXPERIMENT, "reuse-check") as parent:
        # no fit: nothing to train
        teacher = hinton.obtain_hinton_teacher(plan, Lineage(uri, "hinton-mnist", parent, {}))
    assert teacher["trained"] is False and teacher["reused_run_id"] == s["teacher"]["run_id"]
    assert Path(teacher["checkpoint"]).is_file()
    # another teacher setting is another key: nothing to reuse
    other = plan.teacher.with_overrides({"teacher.jitter": 1})
    assert hinton.find_reusable_teacher(uri, EXPERIMENT, hinton.teacher_key(other)) is None
    # student-only augmentation does not shape the teacher: same key, the teacher is reused
    students_jittered = plan.teacher.with_overrides({"train.jitter": 2, "train.flip": True})
    assert hinton.teacher_key(students_jittered) == key
    # neither does the students' budget once the teacher has its own; without it, it does
    own = plan.teacher.with_overrides({"teacher.epochs": 3, "teacher.lr": 0.01})
    longer = own.with_overrides({"train.epochs": 99, "train.lr": 0.5})
    assert hinton.teacher_key(longer) == hinton.teacher_key(own)
    inherited = plan.teacher.with_overrides({"teacher.epochs": None, "train.epochs": 3,
                                             "teacher.lr": 0.01})
    assert hinton.teacher_key(inherited) == hinton.teacher_key(own)
    assert hinton.teacher_key(inherited.with_overrides({"train.epochs": 4})) != \
        hinton.teacher_key(own)


def test_resume_keeps_the_fits_an_interrupted_job_finished(ray_session, mnist_root, tmp_path,
                                                          monkeypatch, cli_stderr):
    """The job is interrupted once the teacher and the baseline have finished (Ctrl-C or `ray job
    stop` as the distilled student starts); `--resume` reopens the same parent run, reads the two
    finished fits back and trains only the distilled student."""
    from mlflow.tracking import MlflowClient

    from raykd.schemes.hinton import job as hinton_job

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["hinton-mnist", "--data-root", str(mnist_root), *FAST, "--set", f"tracking.uri={uri}",
            "--set", "hinton.experiments=[table]", "--set", "hinton.reuse_teacher=false"]
    run_student = hinton_job.run_student

    def interrupted(cfg, role, *args, name=None, **kwargs):
        if name == "distilled":
            raise KeyboardInterrupt
        return run_student(cfg, role, *args, name=name, **kwargs)

    monkeypatch.setattr(hinton_job, "run_student", interrupted)
    assert main(argv) == 130
    monkeypatch.setattr(hinton_job, "run_student", run_student)
    client = MlflowClient(uri)
    [first] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                 "tags.`raykd.scheme` = 'hinton-mnist'")
    assert first.info.status == "KILLED"
    before = {r.info.run_name: r for r in client.search_runs(
        [first.info.experiment_id], f"tags.mlflow.parentRunId = '{first.info.run_id}'")}
    assert set(before) == {"teacher", "baseline"}
    cli_stderr()  # the first run's console

    assert main([*argv, "--resume", "--summary", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["mlflow"]["run_id"] == first.info.run_id
    assert s["resumed"] == ["baseline", "teacher"]
    assert s["teacher"]["run_id"] == before["teacher"].info.run_id
    assert s["baseline"]["run_id"] == before["baseline"].info.run_id
    assert s["baseline"]["resumed"] is True and s["distilled"].get("resumed") is None
    assert s["baseline"]["accuracy"] == before["baseline"].data.metrics["test_accuracy"]
    after = client.search_runs([first.info.experiment_id],
                               f"tags.mlflow.parentRunId = '{first.info.run_id}'")
    assert sorted(r.info.run_name for r in after) == ["baseline", "distilled", "teacher"]
    assert all(r.info.status == "FINISHED" for r in after)
    assert client.get_run(first.info.run_id).info.status == "FINISHED"
    # the resumed baseline's test errors are counted from the weights its run logged
    base = s["baseline"]
    assert base["errors"] == round((1 - base["accuracy"]) * base["test_size"])
    assert s["table"]["baseline_errors"] == base["errors"]


# ---------------------------------------------------------------- configs and bad input

def test_overrides_reach_every_role_and_the_job_section(mnist_root):
    plan = hinton.load_plan(CONFIG, ["train.epochs=7", "hinton.omit_class=5",
                                     "hinton.two_classes=[1, 2]", "tracking.experiment=x"],
                            str(mnist_root))
    assert plan.teacher.train.epochs == plan.baseline.train.epochs == plan.distill.train.epochs == 7
    assert plan.teacher.teacher.epochs == 30  # the teacher's own budget is its own key
    assert {c.tracking.experiment for c in (plan.teacher, plan.baseline, plan.distill)} == {"x"}
    assert {c.data.root for c in (plan.teacher, plan.baseline, plan.distill)} == {
        str(mnist_root.resolve())}
    assert plan.distill.teacher == plan.teacher.teacher
    assert plan.omitted().distill.exclude_classes == [5]
    assert plan.two_class().distill.include_classes == [1, 2]


def test_the_job_section_is_part_of_the_one_config(mnist_root):
    """hinton: is a section of RaykdConfig, read by load_config like any other; the role configs
    the plan validates carry none of it."""
    from raykd.config import HintonConfig, load_config

    cfg = load_config(CONFIG, [f"data.root={mnist_root}", "hinton.omit_class=5"])
    assert isinstance(cfg.hinton, HintonConfig) and cfg.hinton.omit_class == 5
    assert cfg.hinton.two_classes == [7, 8]  # the YAML's own value
    plan = hinton.load_plan(CONFIG, ["hinton.omit_class=5"], str(mnist_root))
    assert plan.job == cfg.hinton
    assert (plan.teacher.hinton, plan.baseline.hinton, plan.distill.hinton) == (None, None, None)
    assert "hinton" not in plan.distill.applicable()


def test_table_seeds_default_to_the_configs_own_seed(mnist_root):
    plan = hinton.load_plan(CONFIG, ["train.seed=4"], str(mnist_root))
    assert plan.job.seeds is None
    [(seed, base, dist)] = plan.seed_runs()
    assert seed == base.train.seed == dist.train.seed == 4
    plan = hinton.load_plan(CONFIG, ["hinton.seeds=[2, 5]"], str(mnist_root))
    assert [(s, b.train.seed, d.train.seed) for s, b, d in plan.seed_runs()] == [(2, 2, 2),
                                                                              (5, 5, 5)]
    assert plan.omitted().train.seed == plan.distill.train.seed == 0


def _summary(base: list[int], dist: list[int]) -> dict:
    runs = [{"seed": i, "baseline": {"errors": b}, "distilled": {"errors": d}}
            for i, (b, d) in enumerate(zip(base, dist, strict=True))]
    return {"table": table_of(90, runs, 10_000), "settings": {"temperature": 20.0}}


def test_one_seed_table_keeps_plain_counts():
    t = _summary([150], [100])["table"]
    assert (t["baseline_errors"], t["distilled_errors"], t["gap_closed_sd"]) == (150, 100, None)
    assert t["gap_closed"] == pytest.approx(50 / 60)
    md = markdown_table(_summary([150], [100]))
    assert "| Baseline 784-800-800-10, hard labels: test errors | 146 | 150 |" in md
    assert "| 91.1% | 83.3% |" in md and "seeds" not in md


def test_several_seeds_average_before_the_gap_is_taken():
    t = _summary([150, 144, 147], [100, 110, 96])["table"]
    assert (t["baseline_errors"], t["distilled_errors"]) == (147.0, 102.0)
    assert t["gap_closed"] == pytest.approx(45 / 57)  # from the means, not the mean of gaps
    assert t["gap_closed_per_seed"] == pytest.approx([50 / 60, 34 / 54, 51 / 57])
    assert t["gap_closed_sd"] == pytest.approx(0.1388, abs=1e-4)
    md = markdown_table(_summary([150, 144, 147], [100, 110, 96]))
    assert "mean of 3 seeds | 74 | 102.0 (seeds: 100, 110, 96) |" in md
    assert "| 91.1% | 78.9% (seeds: 83.3%, 63.0%, 89.5%) |" in md


def test_an_augmented_variant_says_so_in_its_rows():
    summary = _summary([80], [90])
    summary["settings"].update(baseline={"jitter": 2, "flip": False},
                               distilled={"jitter": 2, "flip": False, "teacher_mode": "replay",
                                          "views": 8})
    md = markdown_table(summary)
    assert "| Baseline 784-800-800-10, hard labels, ±2 px jitter: test errors | 146 | 80 |" in md
    assert ("| Distilled 784-800-800-10, T=20.0, ±2 px jitter, teacher replayed on 8 views: "
            "test errors | 74 | 90 |") in md
    assert "| 91.1% | – |" in md  # the baseline beat the teacher: no gap to close


@pytest.mark.parametrize("argv, needle", [
    (["--set", "hinton.seeds=[1,1]"], "hinton.seeds: give distinct non-negative seeds"),
    ([], "data.root: dataset 'mnist' needs data.root"),
    (["--set", "hinton.omit_clas=3"], "hinton.omit_clas: unknown key"),
    (["--set", "hinton.omit_class=10"], "hinton.omit_class: class 10 is outside 0..9"),
    (["--set", "hinton.teacher_config=nope.yaml"], "hinton.teacher_config: file"),
    (["--set", "hinton.shift_high=-20"], "hinton.shift_high: -20.0 is below shift_low -15.0"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, mnist_root, cli_stderr, tmp_path):
    if argv:
        argv = ["--data-root", str(mnist_root), *argv]
    assert main(["hinton-mnist", "--config", str(CONFIG), *argv]) == 2
    err = cli_stderr()
    assert needle in err and len(err.splitlines()) == 1


def test_default_config_is_found_from_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hinton.default_config_path() == CONFIG.resolve()


def test_job_script_runs_from_a_bare_checkout():
    assert JOB.is_file() and os.access(JOB, os.R_OK)
    text = JOB.read_text()
    assert "from _entry import run_verb" in text and 'run_verb("hinton-mnist")' in text
