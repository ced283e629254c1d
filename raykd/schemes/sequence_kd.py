"""Sequence-level knowledge distillation (Kim & Rush 2016, arXiv 1606.07947): the student learns
the teacher's own sequences instead of (or beside) the corpus.

config → teacher (checkpoint, or trained now) → the teacher actor generates continuations of
train prompts (``sequence_kd``: greedy or seeded sampling) into a fingerprinted dataset beside
its cache, or finds the one of the same settings → the student fits on it through the ordinary
``fit`` path (``data.sequences``: the generated rows are its train split; val and test stay the
corpus's) → test loss, perplexity and agreement with the teacher → MLflow + summary.

The loss is ``distill`` as configured: ``ce`` alone is sequence-level KD; with ``token_kd`` (or
another term that reads the teacher), the teacher's per-token cache is built on the generated
rows too — Kim & Rush's word + sequence-level combination, which beat either alone for them.
With ``sequence_kd.mix_original`` the corpus's own train blocks are learned as well.

MLflow: a parent run ``sequence-kd`` holding nested runs ``teacher`` (when trained here),
``generation`` (its settings as params, rows / tokens / seconds as metrics, decoded samples as
``samples.md``) and ``student``.
"""

from __future__ import annotations

import time
from typing import Any

from raykd import tracking
from raykd.config import ConfigError, RaykdConfig, SequenceKDConfig
from raykd.data import build_dataset
from raykd.losses.registry import LOSSES
from raykd.preflight import _teacher_model, preflight
from raykd.schemes.lineage import finished_roles, lineage_run
from raykd.schemes.offline import (_json_safe, language_model_report, log_config, obtain_teacher,
                                   resumed_part, run_student)
from raykd.teacher.generate import prompt_rows
from raykd.teacher.service import generate_with_teacher, serve_teacher, stop_teacher
from raykd.train.fit import RAY_START, ensure_ray, fit_session

SCHEME = "sequence-kd"


def settings(cfg: RaykdConfig) -> SequenceKDConfig:
    return cfg.sequence_kd or SequenceKDConfig()


def needs_teacher(cfg: RaykdConfig) -> bool:
    """Whether a loss term reads the teacher (the combined word + sequence-level variant)."""
    return any(set(LOSSES[t.name].needs) - {"labels"} for t in cfg.distill.terms())


def student_config(cfg: RaykdConfig, folder: str) -> RaykdConfig:
    """The config the student fits with: the generated rows are its train split."""
    return cfg.with_overrides({"data.sequences": folder,
                               "data.sequences_with_original": settings(cfg).mix_original})


def preflight_sequence_kd(cfg: RaykdConfig) -> None:
    """Models, losses and prompts checked in the driver, before Ray starts."""
    if cfg.data.name != "text":
        raise ConfigError(f"data.name: sequence-level KD generates text; it needs data.name: "
                          f"text, not {cfg.data.name!r}")
    if cfg.teacher.ensemble:
        raise ConfigError("teacher.ensemble: sequence-level KD generates with one teacher; "
                          "give teacher.checkpoint (or neither, to train it)")
    preflight(cfg)
    train = build_dataset(cfg.data, "train")
    if not hasattr(_teacher_model(cfg, train.info), "generate"):
        raise ConfigError(f"teacher.name: sequence-level KD generates with a Hugging Face causal "
                          f"LM; {cfg.teacher.name!r} has no generate (use hf_causal_lm)")
    seq = settings(cfg)
    prompt_rows(train.labels, seq.prompts, seq.prompt_tokens)  # enough blocks for the prompts


def log_generation(uri: str, cfg: RaykdConfig, parent: str, generated: dict[str, Any]
                   ) -> str:
    """The generation as a nested run: settings, size, timing and decoded samples."""
    with tracking.tracked_run(uri, cfg.tracking.experiment, "generation", parent,
                              {"raykd.role": "generation",
                               "raykd.sequences_key": generated["key"]}) as run_id:
        tracking.log_params(uri, run_id, {f"sequence_kd.{k}": v for k, v in
                                          settings(cfg).model_dump().items()})
        tracking.log_metrics(uri, run_id, {k: generated[k] for k in (
            "rows", "tokens", "seconds", "tokens_per_s") if k in generated} | {
            "reused": float(generated["status"] == "reused")})
        lines = [f"# {generated['rows']} sequences ({generated['status']}, key "
                 f"{generated['key']})", ""]
        for i, s in enumerate(generated["samples"]):
            lines += [f"## {i}", "", f"**prompt** {s['prompt']!r}", "",
                      f"**teacher** {s['continuation']!r}", ""]
        tracking.log_text(uri, run_id, "\n".join(lines), "samples.md")
    return run_id


def run_sequence_kd(cfg: RaykdConfig, *, config_path: str | None = None, resume: bool = False,
                    baseline: bool = False) -> dict[str, Any]:
    """``resume``: the newest run of this config continues, its finished teacher, student and
    baseline kept (raykd.schemes.lineage; the generated rows are found by their fingerprint).
    ``baseline``: the same student on the corpus alone (cross-entropy), the same budget."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    started = time.perf_counter()
    with fit_session(cfg, SCHEME, start=True), lineage_run(
            uri, cfg, SCHEME, resume, SCHEME, finished_roles) as lineage:
        parent, done = lineage.parent, lineage.finished
        if not done:  # a resumed parent has its config already
            log_config(uri, parent, cfg, config_path)
        sources, teacher = obtain_teacher(cfg, uri, parent, done.get("teacher"))
        generated = generate_with_teacher(cfg, sources, uri)
        print(f"raykd: sequence-level KD dataset {generated['status']} ({generated['reason']})",
              flush=True)
        generated["run_id"] = log_generation(uri, cfg, parent, generated)
        student = (resumed_part(done["student"], uri) if "student" in done else
                   _fit_student(cfg, generated["path"], sources, teacher, uri, parent))
        lm = language_model_report(cfg, sources, student, uri)  # the corpus's test split
        best = next((h for h in student.get("history", [])
                     if h["epoch"] == student.get("best_epoch")), {})
        student.update(val_loss=best.get("val_loss"), val_perplexity=best.get("val_perplexity"),
                       test_perplexity=lm["student"]["perplexity"])
        if student.get("test_loss") is None:  # a resumed student: measured by the report
            student["test_loss"] = lm["student"]["loss_nats_per_token"]
        teacher.update(accuracy=lm["teacher"]["accuracy"],
                       test_loss=lm["teacher"]["loss_nats_per_token"],
                       test_perplexity=lm["teacher"]["perplexity"])
        tracking.log_metrics(uri, parent, {
            "student_test_loss": lm["student"]["loss_nats_per_token"],
            "student_test_perplexity": lm["student"]["perplexity"],
            "teacher_test_perplexity": lm["teacher"]["perplexity"],
            "student_teacher_agreement": lm["student_teacher_agreement"],
            "sequences": generated["rows"]})
        tracking.set_tags(uri, parent, {"raykd.sequences_key": generated["key"]})
        summary: dict[str, Any] = {
            "teacher": teacher, "sequences": generated,
            "student": student, "language_model": lm, "resumed": sorted(done),
            "mlflow": {"tracking_uri": uri, "run_id": parent,
                       "experiment": cfg.tracking.experiment},
            "seconds": round(time.perf_counter() - started, 1),
            "ray_start_seconds": RAY_START.get("seconds")}
        if baseline:
            summary["baseline"] = (resumed_part(done["baseline"], uri) if "baseline" in done
                                   else run_student(cfg, "baseline", uri, parent))
            tracking.log_metrics(uri, parent, {
                "baseline_test_loss": summary["baseline"].get("test_loss") or float("nan")})
        tracking.log_dict(uri, parent, _json_safe(summary), "summary.json")
    return summary


def _fit_student(cfg: RaykdConfig, folder: str, sources: list[str], teacher: dict[str, Any],
                 uri: str, parent: str) -> dict[str, Any]:
    """The student on the generated rows (``folder``), read by the teacher actor as well when a
    loss term needs the teacher."""
    student_cfg = student_config(cfg, folder)
    init_from = sources[0] if cfg.student.init_from_teacher else None
    service = serve_teacher(student_cfg, sources, uri) if needs_teacher(cfg) else None
    try:
        return run_student(student_cfg, "student", uri, parent,
                           service.handoff if service else None, init_from=init_from)
    finally:
        if service is not None:
            teacher["cache"] = service.cache
            stop_teacher(service)


def run_sequence_kd_command(cfg: RaykdConfig, args) -> dict[str, Any]:
    """``raykd seq-kd``: ``cfg`` as the CLI loaded it (raykd.cli.load_args)."""
    preflight_sequence_kd(cfg)
    summary = run_sequence_kd(cfg, config_path=args.config, resume=args.resume,
                              baseline=args.baseline)
    seq, student = summary["sequences"], summary["student"]
    print(f"\n  sequences  {seq['rows']} × {seq['width']} tokens, {seq['status']} "
          f"(key {seq['key']})\n  student    test loss {student['test_loss']:.4f} nats/token, "
          f"perplexity {student['test_perplexity']:.3f}")
    if summary.get("baseline", {}).get("test_loss") is not None:
        print(f"  baseline   test loss {summary['baseline']['test_loss']:.4f} nats/token "
              f"(the corpus alone, cross-entropy)")
    return summary
