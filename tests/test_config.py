"""Config validation: every bad input is one clear line naming the field; good input round-trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raykd.config import ConfigError, dump_yaml, load_config

BAD_OVERRIDES = [
    (["trian.epochs=3"], "trian: unknown key"),
    (["train.epochz=3"], "train.epochz: unknown key"),
    (["train.epochs=three"], "train.epochs:"),
    (["distill.temperature=0"], "distill.temperature:"),
    (["distill.temperature=-2"], "distill.temperature:"),
    (["distill.alpha=1.5"], "distill.alpha:"),
    (["distill.alpha=-0.1"], "distill.alpha:"),
    (["data.name=imagenet"], "data.name: unknown dataset 'imagenet'; allowed:"),
    (["student.name=resnet9000"], "student.name: unknown model 'resnet9000'; allowed:"),
    (["teacher.checkpoint=/nope/t.safetensors"], "teacher.checkpoint: file '/nope/t.safetensors'"),
    (["data.name=mnist"], "data.root: dataset 'mnist' needs data.root"),
    (["data.name=mnist", "data.root=/nope"], "data.root: folder '/nope' does not exist"),
    (["distill.losses=[{name: fitnetz}]"], "distill.losses.0.name: unknown loss 'fitnetz'"),
    (["train.epochs"], "--set train.epochs: expected section.key=value"),
    (["distill.losses.3.weight=1"], "distill.losses"),
    # issue #17: the frozen teacher run on each batch is `live`; `online` names peers trained
    # together, so the old value is one error pointing at the new one.
    (["teacher.mode=online"], "teacher.mode: 'online' was renamed 'live'"),
    (["teacher.mode=online"], "set teacher.mode=live"),
    # issue #28: replay's cache renders views from train.jitter/flip only; transforms applied
    # after the view would show the student an image the teacher never labelled.
    (["teacher.mode=replay", "train.jitter=2", "train.augment=[{name: RandomHorizontalFlip}]"],
     "train.augment: replay's cached views are rendered from train.jitter/train.flip only"),
]


@pytest.mark.parametrize("overrides,expected", BAD_OVERRIDES)
def test_bad_values_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_defaults_are_the_embedded_digits_config(tmp_path, monkeypatch, embedded_default):
    monkeypatch.chdir(tmp_path)  # works from any working directory
    cfg = load_config()
    assert cfg.data.name == "digits"
    assert cfg.train.num_workers == 2
    # README command 1's recipe, as its table states it: Hinton's loss at T=4, alpha 0.9; 10% of
    # train labelled (the rest an unlabelled pool); a 600-epoch teacher, a 100-epoch student
    assert (cfg.distill.temperature, cfg.distill.alpha) == (4.0, 0.9)
    assert cfg.data.labelled == 0.1
    assert (cfg.teacher.epochs, cfg.train.epochs) == (600, 100)
    repo = Path(__file__).resolve().parents[1]
    shipped = (repo / "raykd" / "configs" / "digits.yaml").read_text()
    assert (repo / "configs" / "digits.yaml").read_text() == shipped  # the editable copy


def test_overrides_parse_yaml_values_and_nested_keys():
    cfg = load_config(None, ["distill.temperature=8", "student.args.hidden_sizes=[64, 64]",
                             "train.use_gpu=false", "tracking.experiment=x"])
    assert cfg.distill.temperature == 8.0
    assert cfg.student.args["hidden_sizes"] == [64, 64]
    assert cfg.train.use_gpu is False


def test_default_loss_is_hinton_with_alpha_split():
    cfg = load_config(None, ["distill.alpha=0.7"])
    terms = {t.name: t.weight for t in cfg.distill.terms()}
    assert terms == {"ce": pytest.approx(0.3), "kd": pytest.approx(0.7)}


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["distill.temperature=3", "train.lr=0.01"])
    path = tmp_path / "c.yaml"
    dump_yaml(cfg, path)
    assert load_config(path) == cfg


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"--config: .*bad.yaml line \d+ is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="--config: file"):
        load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ConfigError, match=r"^--config: .*model.safetensors is not a text file"):
        load_config(binary)


def test_yaml_is_safe_loaded(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_example_configs_validate():
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs, "configs/ holds the user-editable examples"
    for path in configs:
        raw = yaml.safe_load(path.read_text())
        if raw.get("data", {}).get("root") is None and raw.get("data", {}).get("name") not in (
                None, "digits", "synthetic"):
            continue  # needs --set data.root=...; validated in its own job's tests
        load_config(path)


def left_behind(folder: Path) -> list[str]:
    """What a command left in ``folder``, except the data store a preflight prepared to check
    the data against (``.raykd/data``: published whole, reused by the next run)."""
    stores = folder / ".raykd" / "data"
    if stores.is_dir() and [p.name for p in (folder / ".raykd").iterdir()] == ["data"]:
        assert all((p / "manifest.json").is_file() for p in stores.iterdir()), "half-written"
        return sorted(p.name for p in folder.iterdir() if p.name != ".raykd")
    return sorted(p.name for p in folder.iterdir())


CLI_CASES = [
    ["distill", "--set", "distill.temperature=0"],
    ["distill", "--set", "distill.alpha=2"],
    ["distill", "--set", "bogus.key=1"],
    ["distill", "--set", "data.name=nope"],
    ["distill", "--config", "/nope/missing.yaml"],
    ["distill", "--frobnicate"],
    ["train-teacher", "--set", "teacher.name=resnet9000"],
    ["distill", "--set", "train.keep_checkpoint=first"],
    ["distill", "--set", "train.checkpoint_seconds=0"],
    ["distill", "--set", "train.checkpoint_every=-1"],
    # generational schemes (issue #16): each line names its field
    ["born-again", "--generations", "0"],
    ["born-again", "--set", "born_again.students=[{name: resnet9000}]"],
    ["born-again", "--set", "teacher.ensemble=[/nope.safetensors]"],
    ["noisy-student", "--rounds", "-1"],
    ["noisy-student"],  # no data.labelled
    ["noisy-student", "--set", "data.labelled=1.5"],
    ["noisy-student", "--set", "data.labelled=0"],
    ["noisy-student", "--set", "data.labelled=100000"],
    ["noisy-student", "--set", "data.labelled=0.1", "--set", "student.args.hidden_sizes=[4]"],
    ["noisy-student", "--set", "data.labelled=0.1",
     "--set", "noisy_student.noise.stochastic_depth=0.2"],
    ["noisy-student", "--set", "data.labelled=0.1", "--set", "teacher.mode=replay"],
    ["distill", "--set", "train.augment=[{name: RandomWobble}]"],
    ["distill", "--set", "teacher.mode=replay", "--set", "train.flip=true",
     "--set", "train.augment=[{name: RandomHorizontalFlip}]"],
    ["distill", "--set", "data.val_fraction=0"],  # keep_checkpoint=best needs a val split
    # online distillation (issue #17)
    ["online", "--peers", "1"],
    ["online", "--scheme", "nope"],
    ["online", "--scheme", "one", "--set", "online.split_at=layers.7"],
    ["online", "--scheme", "byot", "--set", "online.exits=[nope]"],
    ["online", "--scheme", "codistill", "--set", "online.staleness_steps=0"],
    ["distill", "--set", "teacher.mode=online"],  # renamed `live` (issue #17)
    ["distill", "--register", "a/b"],  # issue #18: not addressable as models:/NAME/VERSION
    ["distill", "--register", " "],
]


@pytest.mark.parametrize("argv", CLI_CASES, ids=lambda a: " ".join(a[1:]))
def test_cli_bad_input_exits_2_with_one_line_and_starts_nothing(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raykd.cli", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("raykd: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    # Nothing was started or half-written: no MLflow store, no cache, no Ray Train storage.
    assert left_behind(tmp_path) == []


# -- online terms outside `raykd online` (issue #28) -------------------------------------------
PEER_VERBS = {
    "distill": [],
    "tune": ["--set", "tune.space={distill.temperature: {grid: [2, 4]}}"],
    "born-again": [],
    "noisy-student": ["--set", "data.labelled=0.1",
                      "--set", "student.args.hidden_sizes=[512,512]"],
    "seq-kd": ["--set", "data.name=text", "--set", "data.path=corpus.txt"],
    "hinton-mnist": ["--data-root", "mnist"],
}


@pytest.mark.parametrize("verb,term", [*((v, "dml") for v in PEER_VERBS),
                                       *(("distill", t) for t in ("one", "byot", "codistill"))])
def test_online_terms_are_refused_by_verbs_without_a_cohort(verb, term, tmp_path, monkeypatch,
                                                            cli_stderr):
    """Once they passed validation and failed in a worker after the teacher and its cache
    (dml, one: exit 1 after Ray Train's retries) or trained on CE alone (codistill: exit 0)."""
    import ray

    from raykd.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("the king speaks in the hall.\n" * 200)
    from test_hinton import write_tiny_mnist

    write_tiny_mnist(tmp_path / "mnist", n_train=50, n_test=20)
    made = sorted(p.name for p in tmp_path.iterdir())

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a config error")

    # ray.init only: a patched raykd.train.fit.ensure_ray would be bound for good by the scheme
    # modules this test imports first (the tune tests then found it). Where the session's Ray
    # is already up, a check that let the job through would train and write files (below).
    monkeypatch.setattr(ray, "init", no_ray)
    argv = [verb, "--set", f"distill.losses=[{{name: {term}}}]", *PEER_VERBS[verb]]
    assert main(argv) == 2
    err = cli_stderr()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"raykd: error: distill.losses.0: '{term}' is an online term"), err
    assert f"run `raykd online --scheme {term}`" in err
    # no MLflow store, no cache, no Ray Train storage
    assert left_behind(tmp_path) == made


@pytest.mark.parametrize("verb", ["distill", "born-again"])
def test_an_online_section_is_refused_by_verbs_without_a_cohort(verb, tmp_path, monkeypatch,
                                                                 cli_stderr):
    """`raykd distill` with an `online:` section built the cohort in the loop and trained it as
    the student, without a word."""
    from raykd.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([verb, "--set", "online.scheme=dml"]) == 2
    err = cli_stderr()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("raykd: error: online: this section configures `raykd online`"), err
    assert left_behind(tmp_path) == []


@pytest.mark.parametrize("scheme", ["dml", "codistill"])
def test_the_online_verb_still_takes_its_terms(scheme, tmp_path, monkeypatch):
    from raykd.schemes.online.run import preflight_online

    monkeypatch.chdir(tmp_path)
    cfg = preflight_online(load_config(None, {"online.scheme": scheme}))
    assert [t.name for t in cfg.distill.losses] == [scheme]
