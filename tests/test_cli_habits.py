"""One set of habits across the verbs (issue #28): help on every argument, --config/--set on
report and cache, --out always a folder, the scheme verbs' shared preamble, ONE's and BYOT's
stage defaults, and --resume on train-teacher (a real fit, then kept)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from raykd.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser):
    yield parser.prog, parser
    for action in parser._actions:  # argparse has no public walk over its sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def test_every_argument_of_every_verb_has_help():
    parser = build_parser()
    verbs = [prog for prog, _ in _subparsers(parser)][1:]
    assert "raykd report" in verbs and "raykd cache" in verbs and "raykd seq-kd" in verbs
    missing = [f"{prog} {action.dest}" for prog, p in _subparsers(parser)
               for action in p._actions
               if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert missing == []


def test_online_scheme_lists_its_choices(capsys):
    with pytest.raises(SystemExit):
        main(["online", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "dml | one | byot | codistill" in text
    assert main(["online", "--scheme", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["train-teacher", "online", "seq-kd", "distill", "born-again",
                                  "noisy-student", "tune"])
def test_every_training_verb_takes_resume(verb):
    assert build_parser().parse_args([verb, "--resume"]).resume is True


@pytest.mark.parametrize("verb", ["distill", "noisy-student", "online", "seq-kd"])
def test_baseline_where_it_means_something(verb):
    assert build_parser().parse_args([verb, "--baseline"]).baseline is True


def test_report_reads_its_tracking_uri_from_the_config(tmp_path, monkeypatch):
    import raykd.report

    seen = {}
    monkeypatch.setattr(raykd.report, "run_report",
                        lambda exp, uri, out: seen.update(exp=exp, uri=uri, out=out) or {})
    config = tmp_path / "c.yaml"
    config.write_text(f"tracking: {{uri: 'sqlite:///{tmp_path}/a.db', experiment: exp-a}}\n")
    assert main(["report", "--config", str(config), "--out", str(tmp_path / "r")]) == 0
    assert seen == {"exp": "exp-a", "uri": f"sqlite:///{tmp_path}/a.db", "out": tmp_path / "r"}
    # --set wins over the file; --tracking-uri is its alias; --experiment names another
    assert main(["report", "--config", str(config), "--set", "tracking.experiment=exp-b"]) == 0
    assert seen["exp"] == "exp-b" and seen["out"].name == "report"
    assert main(["report", "--tracking-uri", "sqlite:////tmp/b.db", "--experiment", "x"]) == 0
    assert seen["uri"] == "sqlite:////tmp/b.db" and seen["exp"] == "x"


@pytest.mark.parametrize("argv", [["train-teacher", "--out", "teacher.safetensors"],
                                  ["report", "--out", "report.md"]])
def test_out_is_a_folder_everywhere(argv, tmp_path, monkeypatch, cli_stderr):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = cli_stderr()
    assert err.startswith("raykd: error: --out:") and "folder" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything started


@pytest.mark.parametrize("action", ["inspect", "verify"])
def test_cache_inspect_and_verify_default_to_the_configs_cache_dir(action, tmp_path,
                                                                    cli_stderr):
    caches = tmp_path / "my-caches"
    caches.mkdir()
    assert main(["cache", action, "--set", f"teacher.cache_dir={caches}"]) == 2
    err = cli_stderr()  # the config's folder was looked in (it holds no cache yet)
    assert err.startswith(f"raykd: error: path: {caches} is not a raykd cache"), err


def test_cache_build_honours_its_path(tmp_path, monkeypatch):
    import raykd.teacher.commands

    built = {}
    monkeypatch.setattr(raykd.teacher.commands, "build",
                        lambda cfg: built.update(cache_dir=cfg.teacher.cache_dir) or {})
    assert main(["cache", "build", str(tmp_path / "here")]) == 0
    assert built["cache_dir"] == str(tmp_path / "here")


@pytest.mark.parametrize("argv, section, expected", [
    (["born-again", "--generations", "3", "--ensemble-includes-teacher"], "born_again",
     {"generations": 3, "ensemble_includes_teacher": True}),
    (["noisy-student", "--rounds", "2"], "noisy_student", {"rounds": 2}),
    (["online", "--scheme", "one", "--peers", "3"], "online", {"scheme": "one", "peers": 3}),
    (["online"], "online", {"scheme": "dml"}),
    (["born-again", "--set", "born_again.generations=4"], "born_again", {"generations": 4})])
def test_scheme_verbs_share_one_preamble(argv, section, expected):
    from raykd.cli import load_args

    cfg = load_args(build_parser().parse_args(argv), section,
                    {"born_again": ("generations", "ensemble_includes_teacher"),
                     "noisy_student": ("rounds",), "online": ("scheme", "peers")}[section])
    got = getattr(cfg, section)
    assert got is not None  # the verb asks for its scheme: its defaults when the config has none
    assert {k: getattr(got, k) for k in expected} == expected


@pytest.mark.parametrize("scheme, field, expected", [("one", "split_at", "flatten"),
                                                     ("byot", "exits", ["flatten"])])
def test_one_and_byot_run_on_the_default_model_without_settings(scheme, field, expected):
    """The default (digits, a 1-hidden-layer MLP) needs no online.split_at / online.exits: the
    resolved cohort builds, and one training step of its loss lowers it."""
    from raykd.config import load_config
    from raykd.data import build_dataset
    from raykd.losses import DistillLoss
    from raykd.models.cohort import build_cohort
    from raykd.models.hooks import probe_shapes
    from raykd.schemes.online.run import preflight_online
    from raykd.train.step import DistillStep

    cfg = preflight_online(load_config(None, {"online.scheme": scheme}))
    assert getattr(cfg.online, field) == expected
    train = build_dataset(cfg.data, "train")
    torch.manual_seed(0)
    cohort = build_cohort(cfg, train.info).train()
    paths = cfg.distill.layer_paths("student")
    _, x, y = train.get_batch(torch.arange(256))
    shapes = probe_shapes(cohort, paths, x[:2], "online") if paths else {}
    step = DistillStep(cohort, DistillLoss(cfg.distill, shapes, {}), paths)  # as the loop does
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    losses = []
    for _ in range(2):
        total, _ = step(x, None, y, {}, 0, False)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[1] < losses[0]


def test_train_teacher_resume_keeps_the_finished_teacher(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["train-teacher", "--set", "teacher.epochs=1",
              "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main([*common, "--out", "first", "--summary", "first.json"]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    assert (tmp_path / "first" / "model.safetensors").is_file()
    assert first["resumed"] == []
    assert main([*common, "--resume", "--out", "again", "--summary", "again.json"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["resumed"] == ["teacher"]  # read back, not trained again
    assert again["teacher"]["run_id"] == first["teacher"]["run_id"]
    assert again["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert again["teacher"]["accuracy"] == pytest.approx(first["teacher"]["accuracy"])
    assert ((tmp_path / "again" / "model.safetensors").read_bytes()
            == (tmp_path / "first" / "model.safetensors").read_bytes())
