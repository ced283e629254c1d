"""raykd command line: verbs only — parse, load the config, call a scheme, print the summary.

Bad input (config, arguments, files) ends with exit code 2 and one line naming the field; nothing
is started before the input has been checked.

Habits every verb shares: ``--config``/``--set`` (the tracking URI, the cache folder and every
other setting come from the config), ``--summary PATH`` (the summary JSON), ``--resume`` on every
training verb (the newest run of the same config continues, its finished fits kept:
raykd.schemes.lineage), ``--baseline`` where a same-budget baseline means something, and
``--out DIR``: always a folder the verb writes its files into.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from raykd.config import ConfigError, OnlineConfig, RaykdConfig, load_config, parse_overrides
from raykd.tracking import redact  # a password in a URI is never printed


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise ConfigError(f"arguments: {message}; see raykd {self.prog.split()[-1]} --help")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded digits config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.temperature=8 (repeatable)")
    p.add_argument("--summary", metavar="PATH", help="write the summary JSON here")
    p.add_argument("--verbose", action="store_true",
                   help="print Ray's and MLflow's INFO lines and a progress line every epoch")


def _resume_arg(p: argparse.ArgumentParser, what: str = "its finished fits are kept") -> None:
    p.add_argument("--resume", action="store_true",
                   help=f"continue the newest run of this config: {what}")


def _baseline_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--baseline", action="store_true", help=f"also train {what}, same budget")


def _out_arg(p: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    p.add_argument("--out", metavar="DIR", default=default,
                   help=f"a folder to write {what} into (made if missing)"
                        + (f"; default {default}/" if default else ""))


def _training_verbs(verbs) -> None:
    p = verbs.add_parser("distill", help="distil a student from a teacher (trains one if needed)")
    _config_args(p)
    _baseline_arg(p, "the same student on hard labels only")
    p.add_argument("--register", metavar="NAME",
                   help="register the student as a version of MLflow model NAME "
                        "(tracking.register_as)")
    _resume_arg(p, "its finished fits (teacher, student, baseline) are kept")
    p = verbs.add_parser("train-teacher", help="train the teacher with Ray Train")
    _config_args(p)
    _out_arg(p, "a copy of the checkpoint (model.safetensors)")
    _resume_arg(p, "a teacher it finished is kept, not trained again")
    # No --baseline: the teacher has no student to be compared with.
    p = verbs.add_parser("born-again", help="born-again networks: K generations, each taught "
                                            "by the last, and their ensemble (BAN-E)")
    _config_args(p)
    p.add_argument("--generations", type=int, metavar="K",
                   help="generations after generation 0 (born_again.generations)")
    p.add_argument("--ensemble-includes-teacher", action="store_true",
                   help="BAN-E averages generations 0..K instead of 1..K")
    _resume_arg(p, "it continues after its last finished generation")
    # No --baseline: generation 0 is the same model trained on labels alone, the same budget.
    p = verbs.add_parser("noisy-student", help="Noisy Student self-training over rounds, on "
                                               "labelled + pseudo-labelled data")
    _config_args(p)
    p.add_argument("--rounds", type=int, metavar="R", help="rounds (noisy_student.rounds)")
    _baseline_arg(p, "round 1's student on the labelled part alone")
    _resume_arg(p, "it continues after its last finished round")
    p = verbs.add_parser("online", help="online distillation: members trained together teach "
                                        "each other (DML, ONE, BYOT, codistillation)")
    _config_args(p)
    schemes = get_args(OnlineConfig.model_fields["scheme"].annotation)
    p.add_argument("--scheme", choices=schemes,
                   help=f"which online scheme (online.scheme): {' | '.join(schemes)}")
    p.add_argument("--peers", type=int, metavar="K",
                   help="DML peers / ONE branches / codistillation groups (online.peers)")
    _baseline_arg(p, "each member's model alone")
    _resume_arg(p, "a cohort fit and baselines it finished are kept")
    p = verbs.add_parser("seq-kd", help="sequence-level KD: the teacher generates continuations "
                                        "of train prompts, the student learns them")
    _config_args(p)
    _baseline_arg(p, "the same student on the corpus alone (cross-entropy)")
    _resume_arg(p, "its finished fits (teacher, student, baseline) are kept")
    p = verbs.add_parser("tune", help="Ray Tune search over temperature and loss weights")
    _config_args(p)
    _resume_arg(p, "an interrupted search continues, its finished trials kept")
    p.add_argument("--best-config", metavar="PATH", help="write the winning config as YAML")
    p = verbs.add_parser("hinton-mnist", help="Hinton et al.'s MNIST experiments (jobs/)")
    _config_args(p)
    p.add_argument("--data-root", help="MNIST folder (torchvision layout)")
    p.add_argument("--markdown", metavar="PATH", help="write the comparison table here")
    _resume_arg(p, "its finished fits (teachers, students, baselines) are kept")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="raykd", description="Distributed knowledge distillation on Ray")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=ArgumentParser,
                                  help="what to do; raykd VERB --help for its arguments")
    _training_verbs(verbs)
    p = verbs.add_parser("cache", help="build, inspect or verify teacher soft-label caches")
    p.add_argument("action", choices=["build", "inspect", "verify"],
                   help="build: make the config's teacher cache fresh; inspect: print a cache's "
                        "manifest summary; verify: check every array's sha256 (exit 1 if stale)")
    p.add_argument("path", nargs="?",
                   help="build: the cache directory to build under (teacher.cache_dir); "
                        "inspect/verify: one cache folder or the directory of them "
                        "(default: the config's teacher.cache_dir)")
    _config_args(p)
    verbs.add_parser("losses", help="list the distillation loss terms")
    p = verbs.add_parser("report", help="compare the runs of an MLflow experiment")
    _config_args(p)
    p.add_argument("--experiment",
                   help="the MLflow experiment to compare (default: tracking.experiment)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="the MLflow tracking URI; the same as --set tracking.uri=URI")
    _out_arg(p, "report.md, report.json and the plots", default="report")
    return parser


def _write_summary(summary: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(redact(json.dumps(summary, indent=2, default=str)))


def print_table(summary: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in summary.items()
            if isinstance(v, dict) and "accuracy" in v and v["accuracy"] is not None]
    if not rows:
        return
    lm = "language_model" in summary  # token accuracy, and perplexity (nats per token → exp)
    print("\n  model       test acc    params" + ("    test ppl" if lm else ""))
    for name, part in rows:
        line = f"  {name:<10} {part['accuracy'] * 100:8.2f}%  {part.get('params', 0):>8,}"
        if lm and part.get("test_loss") is not None:
            import math

            line += f"  {math.exp(min(part['test_loss'], 700.0)):10.2f}"
        print(line)
    if "mlflow" in summary:
        run = summary["mlflow"]
        print(f"\n  MLflow run {run['run_id']} at {redact(run['tracking_uri'])}")


def load_args(args, section: str | None = None, flags: tuple[str, ...] = ()) -> RaykdConfig:
    """The preamble of every verb: ``--config``/``--set``; a scheme verb's own flags (``flags``:
    argument names, equal to their keys in ``section``) as overrides of its section, and the
    section's defaults when the config has none (the verb itself asks for the scheme)."""
    overrides = parse_overrides(args.overrides)
    if getattr(args, "register", None) is not None:  # a name as typed, not parsed as YAML
        overrides["tracking.register_as"] = args.register
    if getattr(args, "tracking_uri", None) is not None:  # report's alias
        overrides["tracking.uri"] = args.tracking_uri
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value is not False:
            overrides[f"{section}.{flag}"] = value
    cfg = load_config(args.config, overrides)
    if section is not None and getattr(cfg, section) is None:
        cfg = cfg.with_overrides({section: {}})
    return cfg


def cmd_distill(args) -> dict[str, Any]:
    from raykd.preflight import preflight
    from raykd.schemes.offline import run_distill

    cfg = load_args(args)
    preflight(cfg)
    return run_distill(cfg, baseline=args.baseline, config_path=args.config, resume=args.resume)


def _out_folder(out: str | None) -> Path | None:
    """``--out DIR`` of every verb: a folder (made if missing), never a file name."""
    if out is None:
        return None
    folder = Path(out).expanduser()
    if folder.is_file() or folder.suffix in (".safetensors", ".json", ".md", ".yaml"):
        raise ConfigError(f"--out: {out} names a file; --out is a folder raykd writes its files "
                          f"into, e.g. --out {folder.parent / folder.stem}")
    return folder


def cmd_train_teacher(args) -> dict[str, Any]:
    import shutil

    from raykd.preflight import preflight
    from raykd.schemes.offline import run_train_teacher
    from raykd.teacher.loading import local_checkpoint

    out = _out_folder(args.out)
    cfg = load_args(args)
    preflight(cfg, roles=("teacher",))
    summary = run_train_teacher(cfg, resume=args.resume, config_path=args.config)
    teacher = summary["teacher"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        source = local_checkpoint(teacher["checkpoint"], summary["mlflow"]["tracking_uri"])
        shutil.copy(source, out / "model.safetensors")
        teacher["checkpoint"] = str((out / "model.safetensors").resolve())
    return summary


def cmd_losses(args) -> dict[str, Any]:
    from raykd.losses import describe_losses

    rows = describe_losses()
    print(f"{'key':<16}{'family':<11}{'needs':<22}paper / params")
    for r in rows:
        needs = ",".join(r["needs"])
        print(f"{r['key']:<16}{r['family']:<11}{needs:<22}{r['paper']}")
        for name, desc in r["params"].items():
            print(f"{'':<49}{name}: {desc}")
    return {"losses": rows}


def cmd_cache(args) -> dict[str, Any]:
    from raykd.teacher.commands import cache_command

    if args.action == "build" and args.path:  # PATH: the directory to build the cache under
        args.overrides = [*args.overrides, f"teacher.cache_dir={args.path}"]
    cfg = load_args(args)
    return cache_command(args.action, args.path or cfg.teacher.cache_dir, cfg)


def cmd_tune(args) -> dict[str, Any]:
    from raykd.schemes.tune import run_tune_command

    return run_tune_command(args)


def cmd_born_again(args) -> dict[str, Any]:
    from raykd.schemes.born_again import run_born_again_command

    cfg = load_args(args, "born_again", ("generations", "ensemble_includes_teacher"))
    return run_born_again_command(cfg, args)


def cmd_noisy_student(args) -> dict[str, Any]:
    from raykd.schemes.noisy_student import run_noisy_student_command

    return run_noisy_student_command(load_args(args, "noisy_student", ("rounds",)), args)


def cmd_online(args) -> dict[str, Any]:
    from raykd.schemes.online.run import run_online_command

    return run_online_command(load_args(args, "online", ("scheme", "peers")), args)


def cmd_seq_kd(args) -> dict[str, Any]:
    from raykd.schemes.sequence_kd import run_sequence_kd_command

    return run_sequence_kd_command(load_args(args, "sequence_kd"), args)


def cmd_report(args) -> dict[str, Any]:
    from raykd.report import run_report

    out = _out_folder(args.out)
    cfg = load_args(args)
    return run_report(args.experiment or cfg.tracking.experiment, cfg.tracking.uri, out)


def cmd_hinton(args) -> dict[str, Any]:
    from raykd.schemes.hinton import run_hinton_command

    return run_hinton_command(args)


COMMANDS = {"distill": cmd_distill, "train-teacher": cmd_train_teacher, "losses": cmd_losses,
            "cache": cmd_cache, "tune": cmd_tune, "report": cmd_report,
            "hinton-mnist": cmd_hinton, "born-again": cmd_born_again,
            "noisy-student": cmd_noisy_student, "online": cmd_online, "seq-kd": cmd_seq_kd}


def _sigterm_as_interrupt():
    """`ray job stop` and `kill` send SIGTERM, which would end the driver with its MLflow runs
    left RUNNING: raise KeyboardInterrupt instead, so they end KILLED. Returns the handler to
    put back (None off the main thread, where Python allows no handler)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    import signal

    previous = _sigterm_as_interrupt()
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    from raykd.train.fit import TrainingError

    try:
        args = build_parser().parse_args(argv)
        from raykd import console

        console.set_verbose(getattr(args, "verbose", False))
        summary = COMMANDS[args.verb](args)
    except ConfigError as err:
        print(f"raykd: error: {redact(str(err))}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"raykd: training failed: {redact(str(err).splitlines()[0])}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raykd: interrupted", file=sys.stderr)
        return 130
    if args.verb not in ("losses", "cache", "born-again", "noisy-student", "online", "seq-kd"):
        print_table(summary)
    _write_summary(summary, getattr(args, "summary", None))
    return int(summary.get("exit_code", 0)) if isinstance(summary, dict) else 0


def run() -> None:
    """The console script (``raykd``, ``python -m raykd.cli``): ``main()``, then the normal exit
    handlers (Ray's shutdown of a local cluster, MLflow's and logging's flushes), then no
    interpreter teardown: tearing down torch, MLflow and Ray's modules took 3.7 s after a job had
    finished, measured. Registered first, this handler runs last."""
    import atexit
    import os

    code = {"rc": 1}

    def exit_now() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code["rc"])

    atexit.register(exit_now)
    code["rc"] = main()
    sys.exit(code["rc"])


if __name__ == "__main__":
    run()
