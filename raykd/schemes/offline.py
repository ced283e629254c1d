"""Offline distillation: a fixed teacher (trained first when none is given) teaches a student.

config → teacher (checkpoint | MLflow URI | ensemble | trained now) → teacher actor + cache →
student fit (Ray Train) → optional baseline fit → test accuracies → MLflow + summary.

With ``resume`` (``raykd distill --resume``) the newest parent run of the same config continues:
its finished fits (teacher, student, baseline; each tags its weights ``raykd.checkpoint``) are
read back instead of retrained, and the runs its dead driver left RUNNING are marked KILLED
(raykd.schemes.lineage).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from raykd import tracking
from raykd.config import ConfigError, RaykdConfig, dump_yaml
from raykd.data import build_dataset, dataset_info
from raykd.data.cross_tokens import teacher_data_config, teacher_tokenizer_file
from raykd.schemes.lineage import finished_roles, lineage_run
from raykd.teacher.loading import local_checkpoint
from raykd.teacher.service import serve_teacher, stop_teacher, teacher_stats
from raykd.train.checkpoint import load_model, read_checkpoint
from raykd.train.fit import RAY_START, ensure_ray, fit, fit_session
from raykd.train.lm_eval import cross_tokenizer_report, lm_test_report, perplexity
from raykd.train.transfer import transfer_set


def predict_checkpoints(sources: list[str], cfg: RaykdConfig, tracking_uri: str,
                        split: str = "test", fallback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every model's logits on a split, in the driver: ([models, N, C] float32, labels [N])."""
    ds = build_dataset(cfg.data, split)
    models = [load_model(local_checkpoint(s, tracking_uri), fallback or cfg.teacher, ds.info)
              for s in sources]
    out = []
    with torch.inference_mode():
        for chunk in torch.arange(len(ds)).split(1024):
            _, x, _ = ds.get_batch(chunk)
            out.append(torch.stack([m.eval()(x).float() for m in models]))
    if not out:
        return torch.empty(len(models), 0, ds.info.num_classes), ds.labels
    return torch.cat(out, dim=1), ds.labels


def evaluate_checkpoints(sources: list[str], cfg: RaykdConfig, tracking_uri: str,
                         split: str = "test", fallback=None) -> float:
    """Accuracy of one model or an ensemble (averaged logits) on a split, in the driver."""
    logits, labels = predict_checkpoints(sources, cfg, tracking_uri, split, fallback)
    return float((logits.mean(0).argmax(-1) == labels).float().mean()) if len(labels) else 0.0


def language_model_report(cfg: RaykdConfig, sources: list[str], student: dict[str, Any],
                          tracking_uri: str) -> dict[str, Any]:
    """Test split, in the driver: the teacher's and the student's accuracy, nats per token and
    perplexity, and the student's top-1 agreement with the teacher (raykd.train.lm_eval)."""
    test = build_dataset(cfg.data, "test")
    own = teacher_tokenizer_file(cfg, test.info)  # teacher.tokenizer: its own test tokens
    t_test = build_dataset(teacher_data_config(cfg, own), "test") if own else test
    teacher = load_model(local_checkpoint(sources[0], tracking_uri), cfg.teacher, t_test.info)
    model = load_model(local_checkpoint(student["checkpoint"], tracking_uri), cfg.student,
                       test.info, field="student")
    if own is not None:
        return cross_tokenizer_report(teacher, t_test, model, test)
    return lm_test_report(teacher, model, test)


def count_checkpoint_params(source: str, tracking_uri: str) -> int:
    state, _, _ = read_checkpoint(local_checkpoint(source, tracking_uri))
    return int(sum(t.numel() for k, t in state.items() if t.is_floating_point()
                   and "running_" not in k))


def log_config(uri: str, run_id: str, cfg: RaykdConfig, config_path: str | None) -> None:
    tracking.log_params(uri, run_id, cfg.applicable(uri))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.resolved.yaml"
        dump_yaml(cfg, resolved)
        tracking.log_artifact(uri, run_id, resolved, "config")
        if config_path:
            tracking.log_artifact(uri, run_id, config_path, "config")


def train_teacher(cfg: RaykdConfig, uri: str, parent_run_id: str | None,
                  name: str = "teacher", tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the teacher with Ray Train; checkpoint logged to MLflow. Returns its summary part."""
    with tracking.tracked_run(uri, cfg.tracking.experiment, name, parent_run_id,
                              {"raykd.role": "teacher", **(tags or {})}) as run_id:
        if parent_run_id is None:
            log_config(uri, run_id, cfg, None)
        result = fit(cfg, "teacher", tracking_uri=uri, run_id=run_id, name=name)
        weights = str(result.checkpoint / "model.safetensors")
        tracking.log_artifact(uri, run_id, weights, "teacher")
        acc = result.test_accuracy
        tracking.log_metrics(uri, run_id, {"test_accuracy": acc, "params": result.params,
                                           "best_epoch": result.best_epoch})
        # finished: where --resume finds the weights (the artifact, not this machine's disk)
        tracking.set_tags(uri, run_id,
                          {"raykd.checkpoint": f"runs:/{run_id}/teacher/model.safetensors"})
    return {"checkpoint": weights, "accuracy": acc, "params": result.params, "run_id": run_id,
            "mlflow_uri": f"runs:/{run_id}/teacher/model.safetensors",
            "transfer_size": result.transfer_size, "transfer": result.transfer,
            **_fit_part(result)}


def run_train_teacher(cfg: RaykdConfig, *, resume: bool = False,
                      config_path: str | None = None) -> dict[str, Any]:
    """``raykd train-teacher``: the teacher fit under a lineage parent run, so ``resume`` keeps
    a teacher the newest run of this config finished (raykd.schemes.lineage)."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    with lineage_run(uri, cfg, "train-teacher", resume, "train-teacher",
                     finished_roles) as lineage:
        done = lineage.finished
        if not done:  # a resumed parent has its config already
            log_config(uri, lineage.parent, cfg, config_path)
        if "teacher" in done:
            teacher = resumed_part(done["teacher"], uri)
        else:
            ensure_ray()
            teacher = train_teacher(cfg, uri, lineage.parent)
    return {"teacher": teacher, "resumed": sorted(done),
            "mlflow": {"tracking_uri": uri, "run_id": lineage.parent,
                       "experiment": cfg.tracking.experiment}}


def _fit_part(result) -> dict[str, Any]:
    """What the summary says of a fit beside its accuracy: the selected epoch and timings."""
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), None)
    return {"val_accuracy": best["val_accuracy"] if best else None,
            "best_epoch": result.best_epoch, "epochs": len(result.history),
            "wall_seconds": round(result.wall_seconds, 2),
            "worker_start_seconds": round(result.worker_start_seconds, 2),
            "compute_seconds": round(sum(h["epoch_seconds"] + h.get("eval_seconds", 0.0)
                                         for h in result.history), 3),
            "epoch_overhead_seconds": result.epoch_overhead_seconds,
            "checkpoint_epochs": result.checkpoints,
            "recoveries": result.recoveries, "worker_nodes": result.worker_nodes}


def teacher_sources(cfg: RaykdConfig) -> list[str]:
    if cfg.teacher.ensemble:
        return list(cfg.teacher.ensemble)
    return [cfg.teacher.checkpoint] if cfg.teacher.checkpoint else []


def obtain_teacher(cfg: RaykdConfig, uri: str, parent: str, done=None
                   ) -> tuple[list[str], dict[str, Any]]:
    """``done``: the teacher fit an interrupted run of this job finished (--resume)."""
    sources = teacher_sources(cfg)
    if sources:
        return sources, {"source": sources, "trained": False}
    if done is not None:
        return [done.source], {**resumed_part(done, uri), "source": [done.source],
                               "trained": True}
    trained = train_teacher(cfg, uri, parent)
    return [trained["checkpoint"]], {**trained, "source": [trained["checkpoint"]],
                                     "trained": True}


def run_student(cfg: RaykdConfig, role: str, uri: str, parent: str, teacher=None,
                name: str | None = None, init_from: str | None = None,
                tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit a student (or the baseline), evaluate it on test, log it; return its summary part."""
    name = name or role
    with tracking.tracked_run(uri, cfg.tracking.experiment, name, parent,
                              {"raykd.role": role, **(tags or {})}) as run_id:
        start = time.perf_counter()
        result = fit(cfg, role, tracking_uri=uri, run_id=run_id, teacher=teacher, name=name,
                     init_from=init_from)
        weights = str(result.checkpoint / "model.safetensors")
        acc = result.test_accuracy
        final = {"test_accuracy": acc, "params": result.params, "best_epoch": result.best_epoch,
                 "train_seconds": time.perf_counter() - start}
        if result.test_loss is not None:
            final["test_loss"] = result.test_loss  # language models: nats per token
            if cfg.data.name == "text":
                final["test_perplexity"] = perplexity(result.test_loss)
        tracking.log_metrics(uri, run_id, final)
        tracking.log_artifact(uri, run_id, weights, "checkpoint")
        model_uri = _log_model(cfg, uri, run_id, weights, dataset_info(cfg.data), role)
        # finished: where --resume finds the weights and the logged model
        tracking.set_tags(uri, run_id,
                          {"raykd.checkpoint": f"runs:/{run_id}/checkpoint/model.safetensors",
                           "raykd.model_uri": model_uri or ""})
    return {"accuracy": acc, "model_uri": model_uri, "params": result.params, "run_id": run_id,
            "checkpoint": weights, "test_loss": result.test_loss,
            **_fit_part(result),
            "history": result.history, "transfer_size": result.transfer_size,
            "transfer": result.transfer,
            "init_copied": result.init_copied,
            "train_seconds": round(final["train_seconds"], 2)}


def _log_model(cfg: RaykdConfig, uri: str, run_id: str, weights: str, info, role: str
               ) -> str | None:
    model = load_model(weights, cfg.student, info, field="student")
    if cfg.data.name == "text":  # a causal LM: MLflow's transformers flavour, with its tokenizer
        if not hasattr(model, "config"):
            return None  # raykd's own token models have no transformers form
        return tracking.log_hf_model(uri, run_id, model, info.tokenizer_file, role)
    # A batch of 2, not 1: torch.export would specialise the batch dimension to a size-1 example.
    return tracking.log_torch_model(uri, run_id, model, torch.zeros(2, *info.input_shape), role)


def register_student(cfg: RaykdConfig, uri: str, student: dict[str, Any],
                     teacher: dict[str, Any], scheme: str) -> dict[str, Any]:
    """``tracking.register_as`` (--register NAME): the student as a registered model version,
    tagged with what made it: its run, the teacher's run (or checkpoints), the cache, the scheme.
    """
    if not student.get("model_uri"):
        raise ConfigError(f"tracking.register_as: the student of run {student['run_id']} could "
                          f"not be exported as an MLflow model (see its *_export_error.txt "
                          f"artifact); drop --register or use a torch.export-able student")
    tags = {"raykd.scheme": scheme, "raykd.student_run_id": student["run_id"],
            "raykd.teacher_run_id": teacher.get("run_id") or "",
            "raykd.teacher_source": ",".join(map(str, teacher.get("source", []))),
            "raykd.cache_key": (teacher.get("cache") or {}).get("key", ""),
            "raykd.test_accuracy": student.get("accuracy")}
    return tracking.register_model(uri, student["model_uri"], cfg.tracking.register_as, tags)


def resumed_part(member, uri: str) -> dict[str, Any]:
    """A fit an interrupted run finished, as the summary lists it (read back from MLflow)."""
    tags = tracking.client(uri).get_run(member.run_id).data.tags
    return {"accuracy": member.accuracy, "params": member.params, "run_id": member.run_id,
            "checkpoint": member.source, "model_uri": tags.get("raykd.model_uri") or None,
            "resumed": True}


@contextmanager
def _parent_run(uri: str, cfg: RaykdConfig, run_name: str, parent_run_id: str | None,
                resume: bool):
    """(parent run id, the fits an interrupted run finished by role). A job of its own gets a
    lineage parent (tagged with the config's key, so ``resume`` finds it); one nested in
    another scheme's run a plain child run."""
    if parent_run_id is not None:
        with tracking.tracked_run(uri, cfg.tracking.experiment, run_name, parent_run_id,
                                  {"raykd.scheme": "offline"}) as parent:
            yield parent, {}
        return
    with lineage_run(uri, cfg, "offline", resume, run_name, finished_roles) as lineage:
        yield lineage.parent, lineage.finished


def steps_per_epoch(samples: int, cfg: RaykdConfig) -> int:
    """Optimizer steps of one epoch over ``samples``: each worker takes its DistributedSampler
    share (rounded up) in batches of ``train.batch_size`` (raykd.train.loop)."""
    per_worker = -(-samples // cfg.train.num_workers)
    return -(-per_worker // cfg.train.batch_size)


def step_budget(cfg: RaykdConfig, student: dict[str, Any]
                ) -> tuple[RaykdConfig, tuple[int, int]]:
    """The baseline's config, with at least the student's optimizer steps, and (student steps,
    baseline steps). With ``data.labelled`` the baseline learns the labelled part alone, the
    student that and the pool: an epoch of the baseline is then a fraction of the student's
    steps, and equal epochs would compare a student against an undertrained baseline. The
    baseline's epochs are scaled up (never down) until its steps reach the student's; it keeps
    its best validation epoch as every fit does."""
    # a resumed student has no transfer size in its summary part: the whole train split bounds it
    learnt = student.get("transfer_size") or len(build_dataset(cfg.data, "train"))
    student_steps = cfg.train.epochs * steps_per_epoch(learnt, cfg)
    per_epoch = steps_per_epoch(len(transfer_set(cfg, "baseline").indices), cfg)
    epochs = max(cfg.train.epochs, -(-student_steps // per_epoch))
    base_cfg = cfg if epochs == cfg.train.epochs else cfg.with_overrides({"train.epochs": epochs})
    return base_cfg, (student_steps, epochs * per_epoch)


def cluster_part(fits: list[dict[str, Any]], nodes: int) -> dict[str, Any]:
    """How many nodes the cluster had and how many ran this job's training workers."""
    ids = sorted({n for part in fits for n in part.get("worker_nodes", [])})
    return {"nodes": nodes, "worker_nodes": len(ids), "worker_node_ids": ids}


def run_distill(cfg: RaykdConfig, *, baseline: bool = False, config_path: str | None = None,
                parent_run_id: str | None = None, run_name: str = "distill",
                resume: bool = False) -> dict[str, Any]:
    import ray

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    started = time.perf_counter()
    # One worker group runs the teacher, student and baseline fits in turn (fit_session); it
    # starts now, so its workers come up while this process sets up MLflow.
    with fit_session(cfg, run_name, start=True), _parent_run(
            uri, cfg, run_name, parent_run_id, resume) as (parent, done):
        if not done:  # a resumed parent has its config already
            log_config(uri, parent, cfg, config_path)
        sources, teacher = obtain_teacher(cfg, uri, parent, done.get("teacher"))
        if "student" in done:
            student = resumed_part(done["student"], uri)
        else:
            service = serve_teacher(cfg, sources, uri)
            try:
                teacher["cache"] = service.cache
                init_from = sources[0] if cfg.student.init_from_teacher else None
                student = run_student(cfg, "student", uri, parent, service.handoff,
                                      init_from=init_from)
                stats = teacher_stats(service)
                teacher["forward_samples"] = stats["forward_samples"]
                if "live_calls" in stats:  # live mode: how the workers' calls shared passes
                    teacher["live_batching"] = {k: stats[k] for k in (
                        "live_calls", "live_passes", "live_max_calls_per_pass")}
            finally:  # one actor per job; the cache on disk and the driver-owned shards
                # outlive it. Killed AND its name released: a next run starts afresh.
                stop_teacher(service)
        if cfg.data.name == "text":  # teacher, student and their agreement on the test split
            summary_lm = language_model_report(cfg, sources, student, uri)
            teacher["accuracy"] = summary_lm["teacher"]["accuracy"]
            teacher["test_loss"] = summary_lm["teacher"]["loss_nats_per_token"]
        elif teacher.get("accuracy") is None:  # a given teacher: measured here, once
            teacher["accuracy"] = evaluate_checkpoints(sources, cfg, uri)
        if not teacher.get("params"):
            teacher["params"] = count_checkpoint_params(sources[0], uri)
        summary: dict[str, Any] = {"teacher": teacher, "student": student}
        if baseline:
            base_cfg, budget = step_budget(cfg, student)
            summary["baseline"] = (resumed_part(done["baseline"], uri) if "baseline" in done
                                   else run_student(base_cfg, "baseline", uri, parent))
            student["steps"], summary["baseline"]["steps"] = budget
        final = {f"{k}_test_accuracy": v["accuracy"] for k, v in summary.items()}
        final.update({f"{k}_params": v["params"] for k, v in summary.items()})
        if cfg.data.name == "text":
            summary["language_model"] = summary_lm
            final.update(teacher_test_perplexity=summary_lm["teacher"]["perplexity"],
                         student_test_perplexity=summary_lm["student"]["perplexity"],
                         student_teacher_agreement=summary_lm["student_teacher_agreement"])
        tracking.log_metrics(uri, parent, final)
        if cfg.tracking.register_as:
            summary["registered"] = register_student(cfg, uri, student, teacher, "offline")
        summary["cluster"] = cluster_part(list(summary.values()), nodes)
        info = dataset_info(cfg.data)  # the source files an on_bad_file=skip store left out
        summary["data"] = {"identity": info.identity, "sizes": info.sizes,
                           "skipped_files": info.skipped_files}
        summary["resumed"] = sorted(done)
        summary["mlflow"] = {"tracking_uri": uri, "run_id": parent,
                             "experiment": cfg.tracking.experiment}
        summary["seconds"] = round(time.perf_counter() - started, 1)

        summary["ray_start_seconds"] = RAY_START.get("seconds")
        tracking.log_dict(uri, parent, _json_safe(summary), "summary.json")
    return summary


def _json_safe(summary: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(summary, default=str))
