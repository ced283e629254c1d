"""Noisy Student (Xie et al. 2020, arXiv 1911.04252): self-training with a noised student.

``data.labelled`` splits the train split into a labelled part and an unlabelled pool (stratified,
seeded). Round 0 is a teacher trained on the labelled part only (or ``teacher.checkpoint``). In
round r = 1…R, round r−1's model labels the pool through the teacher actor's cache — clean inputs,
eval mode: the teacher is never noised — and round r's student learns the labelled part from its
labels and the pool from those pseudo-labels (``distill.pseudo_labels`` soft | hard, pool samples
below ``distill.confidence_threshold`` left out), under noise: dropout, torchvision v2 input
augmentation and stochastic depth (``noisy_student.noise``). It then teaches round r+1. Each
round's student (``noisy_student.students``, the last repeats; default ``student``) is equal to
or larger than its teacher. ``--baseline`` trains round 1's student, noise included, on the
labelled part alone, for round 0's budget (``teacher.epochs``): what the pool adds.
"""

from __future__ import annotations

from typing import Any

from raykd import tracking
from raykd.config import ConfigError, ModelConfig, NoisyStudentConfig, RaykdConfig
from raykd.data import dataset_info
from raykd.data.labelled import class_counts
from raykd.models import build_model, count_params
from raykd.preflight import preflight
from raykd.schemes.chain import chain_run, given_model, taught_config, train_chain
from raykd.schemes.lineage import log_lineage, markdown, member_row
from raykd.schemes.offline import run_student

SCHEME = "noisy-student"


def settings(cfg: RaykdConfig) -> NoisyStudentConfig:
    return cfg.noisy_student or NoisyStudentConfig()


def round_model(cfg: RaykdConfig, r: int) -> ModelConfig:
    """Round 0: the teacher (noised with ``noise_teacher``). Round r ≥ 1: its student with the
    noise's model arguments."""
    ns = settings(cfg)
    if r == 0:
        base = given_model(cfg)
        if not ns.noise_teacher or cfg.teacher.checkpoint:
            return base
    else:
        base = ns.students[min(r, len(ns.students)) - 1] if ns.students else cfg.student
    args = dict(base.args)
    if ns.noise.dropout is not None:
        args["dropout"] = ns.noise.dropout
    if ns.noise.stochastic_depth is not None:
        args["stochastic_depth"] = ns.noise.stochastic_depth
    return ModelConfig(name=base.name, args=args)


def round_config(cfg: RaykdConfig, r: int) -> RaykdConfig:
    """The config of round ``r`` (≥ 1): round r−1's model teaches a noised student."""
    noise = settings(cfg).noise
    extra = {"train.augment": [t.model_dump() for t in noise.augment]} if noise.augment else {}
    return taught_config(cfg, round_model(cfg, r - 1), round_model(cfg, r), extra)


def first_config(cfg: RaykdConfig) -> RaykdConfig:
    """Round 0's config: with ``noise_teacher``, its model and training carry the noise."""
    ns = settings(cfg)
    if not ns.noise_teacher or cfg.teacher.checkpoint:
        return cfg
    model = round_model(cfg, 0)
    return cfg.with_overrides({"teacher.args": model.args, "teacher.augment": [
        t.model_dump() for t in ns.noise.augment]})


def preflight_noisy_student(cfg: RaykdConfig) -> None:
    """Everything checkable before Ray starts: the labelled split, each round's noised model
    (and that it is not smaller than its teacher), every round's loss terms."""
    if cfg.data.labelled is None:
        raise ConfigError("data.labelled: Noisy Student needs a labelled part; set e.g. "
                          "--set data.labelled=0.1 (the rest of train becomes the unlabelled "
                          "pool)")
    if cfg.teacher.ensemble:
        raise ConfigError("teacher.ensemble: Noisy Student's round 0 is one model; give "
                          "teacher.checkpoint (or neither, to train it)")
    preflight(first_config(cfg), roles=("teacher",))
    info = dataset_info(cfg.data)
    ns = settings(cfg)
    sizes = [count_params(build_model(round_model(cfg, 0), info, field="teacher"))]
    for r in range(1, ns.rounds + 1):
        field = f"noisy_student.students.{min(r, len(ns.students)) - 1}" if ns.students \
            else "student"
        try:
            model = build_model(round_model(cfg, r), info, field=field)
        except ConfigError as err:
            for noise in ("dropout", "stochastic_depth"):
                if f"unknown argument {noise!r}" in str(err):
                    raise ConfigError(f"noisy_student.noise.{noise}: model "
                                      f"{round_model(cfg, r).name} has no {noise}; unset it or "
                                      f"pick a student that has it") from None
            raise
        sizes.append(count_params(model))
        if sizes[r] < sizes[r - 1]:
            raise ConfigError(f"{field}: round {r}'s student has {sizes[r]:,} parameters, fewer "
                              f"than its teacher's {sizes[r - 1]:,}; Noisy Student's student is "
                              f"equal or larger")
        if r == 1 or ns.students:
            preflight(round_config(cfg, r))


def run_noisy_student(cfg: RaykdConfig, *, resume: bool = False, baseline: bool = False,
                      config_path: str | None = None) -> dict[str, Any]:
    ns = settings(cfg)
    with chain_run(cfg, SCHEME, resume, config_path) as (uri, lineage, finish):
        members = train_chain(first_config(cfg), ns.rounds, lambda r: round_config(cfg, r),
                              uri, lineage)
        extra_rows, lines = [], {}
        summary: dict[str, Any] = {}
        if baseline:
            # The labelled part alone, for the budget round 0 trained on it with.
            epochs = cfg.teacher.epochs or cfg.train.epochs
            base = run_student(round_config(cfg, 1).with_overrides({"train.epochs": epochs}),
                               "baseline", uri, lineage.parent, name="baseline-labelled-only")
            summary["baseline"] = {k: base[k] for k in ("accuracy", "params", "run_id",
                                                        "transfer_size", "wall_seconds")}
            extra_rows.append(("baseline", base["accuracy"], "labels only, same noised student"))
            lines["student on labels alone"] = base["accuracy"]
        table = markdown(SCHEME, members, extra_rows)
        log_lineage(lineage, members, lines, table)
        for m in members:
            tracking.log_metrics(uri, lineage.parent, {"test_accuracy": m.accuracy}, step=m.index)
        labelled = class_counts(cfg.data)
        summary.update({
            "rounds": [member_row(SCHEME, m) for m in members],
            "labelled": {"total": sum(labelled), "per_class": labelled,
                         "pool": members[-1].fit.get("transfer", {}).get("pool")},
            "claims": {"each_round_beats_last": [
                members[r].accuracy > members[r - 1].accuracy for r in range(1, len(members))]},
            "markdown": table})
        return finish(summary)


def run_noisy_student_command(cfg: RaykdConfig, args) -> dict[str, Any]:
    """``raykd noisy-student``: ``cfg`` as the CLI loaded it (raykd.cli.load_args)."""
    preflight_noisy_student(cfg)
    summary = run_noisy_student(cfg, resume=args.resume, baseline=args.baseline,
                                config_path=args.config)
    print("\n" + summary["markdown"])
    return summary
