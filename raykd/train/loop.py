"""The per-worker training loop, one function for teacher, student and baseline runs.

Each Ray Train worker builds its own data and model from the validated config (nothing large
travels in the config), takes its DistributedSampler share of the transfer set, and per step looks
up the teacher's cached logits for the batch's sample indices locally. Rank 0 logs to MLflow,
prints one line per epoch and writes the checkpoint.

One function per stage: :func:`setup_phase` (model, handoff, loss, optimiser, resume point,
teacher source, transfer set, augmentation, codistillation), :func:`train_epoch` (one pass:
inputs, teacher targets, the step), :func:`epoch_metrics` (sums all-reduced, validation, LM
metrics), :func:`report_epoch` (checkpoint and Ray Train report) and :func:`finish_phase` (test
accuracy, export); :func:`run_phase` strings them together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raykd.config import ConfigError, RaykdConfig, validate
from raykd.data import build_dataset
from raykd.data.augment import apply_transform, augment, build_transform
from raykd.losses import DistillLoss
from raykd.models import build_model, count_params
from raykd.models.cohort import build_cohort
from raykd.models.hooks import probe_shapes
from raykd.models.init import init_student_from_teacher
from raykd.teacher.client import (CachedTeacher, LiveTeacher, TokenCachedTeacher, replay_inputs,
                                  replay_view)
from raykd.teacher.loading import local_checkpoint
from raykd.train.checkpoint import checkpoint_bytes, load_model
from raykd.train.collective import all_reduce_sum
from raykd.train.evaluate import evaluate_members, evaluate_split
from raykd.train.lm_eval import perplexity
from raykd.train.precision import Precision
from raykd.train.stale_peers import StalePeers
from raykd.train.state import restore_phase, save_phase_checkpoint
from raykd.train.step import DistillStep, RolePlan, make_optimizer, topk_to
from raykd.train.transfer import TransferSet, transfer_set


def _better(metrics: dict[str, float], best: dict | None) -> bool:
    """Higher validation accuracy wins; a tie goes to the lower validation loss."""
    if best is None:
        return True
    key = (metrics["val_accuracy"], -metrics["val_loss"])
    return key > (best["val_accuracy"], -best["val_loss"])


@dataclass
class Phase:
    """What one phase's epochs share on this worker (built once by :func:`setup_phase`)."""

    cfg: RaykdConfig
    plan: RolePlan
    rank: int
    world: int
    device: Any
    info: Any
    model: nn.Module
    loss: nn.Module
    step: nn.Module  # DistillStep, wrapped by DDP
    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: Any
    val_ds: Any
    tset: TransferSet  # with data.labelled: the pool's labels hidden
    handoff: Any = None  # the teacher actor's hand-off (student roles only)
    cached: Any = None  # CachedTeacher / TokenCachedTeacher
    live: LiveTeacher | None = None
    views: int = 1  # replay: cached views per sample (1: not replaying)
    augment_v2: Any = None  # train.augment / teacher.augment transforms
    codistill: StalePeers | None = None
    cohort: bool = False  # online distillation: every member in one module
    copied: list[str] = field(default_factory=list)  # init_from_teacher: what was copied

    @property
    def replay(self) -> bool:
        return self.handoff is not None and self.handoff.mode == "replay"


def _build_model(cfg: RaykdConfig, plan: RolePlan, loop: dict[str, Any], info
                 ) -> tuple[nn.Module, list[str], bool]:
    """The role's model (a cohort for online distillation), its first weights copied from the
    teacher where ``init_from`` says so; with what was copied and whether it is a cohort."""
    role = plan.role
    cohort = role == "student" and cfg.online is not None and cfg.online.scheme != "codistill"
    if cohort:  # online distillation: every member in one module (raykd.models.cohort)
        model = build_cohort(cfg, info)
    else:
        model = build_model(plan.model, info, field="teacher" if role == "teacher" else "student")
    copied: list[str] = []
    if loop.get("init_from") and role == "student":
        teacher_src = local_checkpoint(loop["init_from"], loop.get("tracking_uri") or "")
        copied = init_student_from_teacher(model, load_model(teacher_src, cfg.teacher, info))
    return model, copied, cohort


def _build_step(cfg: RaykdConfig, plan: RolePlan, model: nn.Module, handoff, train_ds, device
                ) -> tuple[nn.Module, nn.Module, Precision]:
    """The loss (its regressors sized by probing both models' hooked features) and the DDP-
    wrapped step; with the precision that runs it."""
    import ray.train.torch

    s_paths = plan.distill.layer_paths("student")
    _, example, _ = train_ds.get_batch(torch.arange(min(2, len(train_ds))))
    s_shapes = probe_shapes(model, s_paths, example.to(device), "student") if s_paths else {}
    t_shapes = {p: torch.Size(s) for p, s in (handoff.feature_shapes if handoff else {}).items()}
    loss = DistillLoss(plan.distill, s_shapes, t_shapes).to(device)
    precision = Precision(cfg.train.precision, device)
    step = ray.train.torch.prepare_model(
        DistillStep(model, loss, s_paths, precision),
        parallel_strategy_kwargs={"find_unused_parameters": loss.pretrain_epochs > 0})
    return step, loss, precision


def _teacher_source(handoff, plan: RolePlan, info):
    """(cached, live): where a student's teacher outputs come from, or (None, None)."""
    if handoff is None:
        return None, None
    if handoff.mode == "live":
        return None, LiveTeacher(handoff, plan.distill.layer_paths("teacher"))
    if handoff.per_token:  # language models: per-token top-k
        if handoff.spec.dataset_identity != info.identity:  # other tokens than the cache's
            raise ConfigError(f"data.tokenizer_dir: this worker's token blocks ({info.identity}) "
                              f"are not the teacher cache's ({handoff.spec.dataset_identity}); "
                              f"on several nodes put data.tokenizer_dir (or data.tokenizer) "
                              f"on storage every node reads")
        return TokenCachedTeacher(handoff), None
    return CachedTeacher(handoff), None


def setup_phase(loop: dict[str, Any], rank: int, world: int, device) -> Phase:
    """Everything the phase's epochs need, built on this worker from the validated config."""
    cfg, role = validate(loop["config"]), loop["role"]  # files: checked by the driver
    plan = RolePlan.of(cfg, role)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank, every phase
    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    info = train_ds.info
    model, copied, cohort = _build_model(cfg, plan, loop, info)
    model.to(device)
    handoff = loop.get("teacher") if role == "student" else None
    step, loss, precision = _build_step(cfg, plan, model, handoff, train_ds, device)
    optimizer = make_optimizer(list(step.parameters()), cfg, plan.lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, plan.epochs)
                 if cfg.train.schedule == "cosine" else None)
    cached, live = _teacher_source(handoff, plan, info)
    if cached is not None and handoff.per_token \
            and handoff.spec.tokenizer_sha256 != info.tokenizer_sha256:
        getattr(step, "module", step).count_agreement = False  # the teacher's own tokenizer
    transforms = cfg.teacher.augment if role == "teacher" else cfg.train.augment
    ph = Phase(cfg, plan, rank, world, device, info, model, loss, step, precision, optimizer,
               scheduler, val_ds, transfer_set(cfg, role, cached), handoff, cached, live,
               augment_v2=build_transform(transforms) if transforms else None,
               cohort=cohort, copied=copied)
    ph.views = handoff.spec.views if ph.replay else 1
    if loop.get("codistill"):  # stale copies of the other groups (raykd.train.stale_peers)
        ph.codistill = StalePeers(loop["codistill"], cfg, info, device, rank, world)
    return ph


def _resume_point(ph: Phase, loop: dict[str, Any], phase_id: int, coordinator
                  ) -> tuple[int, dict | None, list[dict[str, float]]]:
    """(first epoch, best so far, history): after a failure or from a handed-in checkpoint."""
    restored, after_failure = restore_phase(ph.model, ph.loss, ph.optimizer, ph.scheduler, phase_id,
                                       loop.get("resume_from"), ph.rank, ph.device, ph.precision)
    start_epoch, best = (restored.next_epoch, restored.best) if restored else (0, None)
    if ph.scheduler and not (restored and restored.scheduler_restored):
        for _ in range(start_epoch):  # a checkpoint written before schedules were saved
            ph.scheduler.step()
    if after_failure and ph.rank == 0:  # epochs lost and time to recover (raykd.train.group)
        import ray

        # waited for: the coordinator is threaded, so a call not waited for could land after
        # this phase's finish() and the recovery would be missing from its result
        ray.get(coordinator.resumed.remote(phase_id, start_epoch, time.time(),
                                           restored.last_ended_at))
    return start_epoch, best, list(restored.history) if restored else []


def _batch_inputs(ph: Phase, idx, x, epoch: int, gen) -> tuple[torch.Tensor, torch.Tensor | int]:
    """The batch as the model sees it, and the replayed view whose labels it gets (0: none)."""
    cfg, role = ph.cfg, ph.plan.role
    view: torch.Tensor | int = 0
    if ph.replay:  # the cached view whose labels this sample gets this epoch, rendered
        view = replay_view(idx, epoch, ph.views, cfg.train.seed)
        x = replay_inputs(x, idx, view, cfg.train.seed, cfg.train.jitter, cfg.train.flip)
    elif ph.plan.jitter or (role != "teacher" and cfg.train.flip):
        seeds = torch.randint(0, 2**62, (len(idx),), generator=gen)
        x = augment(x, seeds, ph.plan.jitter, cfg.train.flip and role != "teacher")
    if ph.augment_v2 is not None:  # never after a replayed view: a config error
        x = apply_transform(x, torch.randint(0, 2**62, (len(idx),), generator=gen), ph.augment_v2)
    return x, view


def _teacher_targets(ph: Phase, idx, x, y, view, next_batch):
    """(y, teacher logits, teacher features, teacher top-k) for a batch, from the cache (the
    next batch's rows prefetched) or the live teacher; the labels as the transfer set gives them."""
    t_logits, t_feats, t_topk = None, {}, None
    if ph.cached is not None and ph.handoff.per_token:
        t_topk = topk_to(ph.cached.topk(idx), ph.device)
    elif ph.cached is not None:
        t_logits = ph.cached.logits(idx, view)
        y, t_logits = ph.tset.targets(idx, y, t_logits)
    if ph.cached is not None and next_batch is not None:  # read while this step computes
        ph.cached.prefetch(next_batch)
    elif ph.live is not None:
        t_logits, t_feats = ph.live.forward(x)
    return y, t_logits, t_feats, t_topk


def _accumulate(sums: dict[str, float], step: nn.Module, total, parts, n: float, mask) -> None:
    """Add one batch's losses (and, for language models, tokens and teacher agreement)."""
    sums["loss"] += float(total.detach()) * n
    sums["n"] += n
    for k, v in parts.items():
        sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + float(v) * n
    if mask is not None:  # language models: tokens, and agreement with the teacher
        sums["_tokens"] = sums.get("_tokens", 0.0) + float(mask.sum())
        agreement = getattr(getattr(step, "module", step), "agreement", None)
        if agreement is not None:
            agree, tokens = agreement
            sums["_agree"] = sums.get("_agree", 0.0) + agree
            sums["_agree_n"] = sums.get("_agree_n", 0.0) + tokens


def train_epoch(ph: Phase, epoch: int, sampler, global_step: int
                ) -> tuple[dict[str, float], int, bool]:
    """One pass over this rank's share of the transfer set: (sums, global step, pretraining)."""
    cfg, device = ph.cfg, ph.device
    sampler.set_epoch(epoch)
    order = ph.tset.indices[torch.tensor(list(sampler), dtype=torch.long)]
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch)
    batches = order.split(cfg.train.batch_size)
    pretrain = epoch < ph.loss.pretrain_epochs
    sums = {"loss": 0.0, "n": 0.0}
    ph.step.train()
    for b, idx in enumerate(batches):
        idx, x, y = ph.tset.dataset.get_batch(idx)
        x, view = _batch_inputs(ph, idx, x, epoch, gen)
        y, t_logits, t_feats, t_topk = _teacher_targets(
            ph, idx, x, y, view, batches[b + 1] if b + 1 < len(batches) else None)
        x, y = x.to(device), y.to(device)
        t_logits = t_logits.to(device) if t_logits is not None else None
        t_feats = {k: v.to(device) for k, v in t_feats.items()}
        if ph.codistill is not None:
            t_logits = ph.codistill.targets(x, global_step)
        mask = (y != -100) if y.dim() == 2 else None  # token blocks: padding is -100
        total, parts = ph.step(x, t_logits, y, t_feats, epoch, pretrain, mask, t_topk)
        ph.optimizer.zero_grad(set_to_none=True)
        ph.precision.backward_step(total, ph.optimizer)  # total.backward(); optimizer.step()
        global_step += 1
        if ph.codistill is not None:
            ph.codistill.after_step(ph.model, global_step)
        _accumulate(sums, ph.step, total, parts, float(len(idx)), mask)
    if ph.scheduler:
        ph.scheduler.step()
    return sums, global_step, pretrain


def epoch_metrics(ph: Phase, epoch: int, sums: dict[str, float], started: float, pretrain: bool,
                  checkpoint_due: bool) -> tuple[dict[str, float], dict[str, float]]:
    """The epoch's metrics (sums over every rank, validation, LM metrics) and the raw sums."""
    # Rank 0's clock decides a time-based checkpoint; the sum hands its decision to every
    # rank, because a Ray Train report is a barrier that all ranks must reach together.
    sums["_due"] = float(checkpoint_due)
    keys = sorted(sums)
    reduced = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], ph.world), strict=True))
    seconds = time.perf_counter() - started
    metrics = {("train_loss" if k == "loss" else k): v / max(reduced["n"], 1)
               for k, v in reduced.items() if not k.startswith("_") and k != "n"}
    t1 = time.perf_counter()
    val_acc, val_loss = evaluate_split(ph.model, ph.val_ds, ph.device, ph.rank, ph.world)
    if ph.cohort:  # each member's curve, for its own MLflow run
        for name, (acc, ce) in evaluate_members(ph.model, ph.val_ds, ph.device, ph.rank,
                                                ph.world).items():
            metrics.update({f"{name}_val_accuracy": acc, f"{name}_val_loss": ce})
    metrics.update(val_accuracy=val_acc, val_loss=val_loss, epoch=epoch,
                   epoch_seconds=seconds, eval_seconds=time.perf_counter() - t1,
                   samples_per_s=reduced["n"] / max(seconds, 1e-9), pretrain=float(pretrain))
    if "_tokens" in reduced:  # language models: val_loss is in nats per token
        metrics.update(val_perplexity=perplexity(val_loss),
                       tokens_per_s=reduced["_tokens"] / max(seconds, 1e-9))
        if "_agree_n" in reduced:
            metrics["teacher_agreement"] = reduced["_agree"] / max(reduced["_agree_n"], 1)
    return metrics, reduced


def report_epoch(ph: Phase, epoch: int, metrics: dict[str, float], phase_id: int, best,
                 history: list, due: bool) -> None:
    """Ray Train's report of the epoch, with every rank's checkpoint folder when one is due."""
    import ray.train

    checkpoint = None
    if due:
        spec = {"name": ph.plan.model.name, "args": ph.plan.model.args}
        checkpoint = save_phase_checkpoint(ph.model, ph.loss, ph.optimizer, ph.scheduler, spec,
                                           ph.info, epoch, metrics, phase_id, best, history,
                                           ph.rank, ph.device, ph.precision)
    # the temp folder goes once uploaded (every rank writes one per checkpoint)
    ray.train.report({k: v for k, v in metrics.items() if not k.startswith("_")},
                     checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)


def finish_phase(ph: Phase, best, result: dict[str, Any]) -> dict[str, Any]:
    """The kept weights (best on validation, or the last), their test accuracy and, on rank 0,
    the weights as safetensors bytes (a cohort's members each as its own checkpoint)."""
    if ph.cached is not None:
        ph.cached.close()
    result["best_epoch"] = ph.plan.epochs - 1  # the last epoch, or the best one below
    if best is not None:
        ph.model.load_state_dict(best["state"])
        result["best_epoch"] = best["epoch"]
    test_ds = build_dataset(ph.cfg.data, "test")
    acc, loss = evaluate_split(ph.model, test_ds, ph.device, ph.rank, ph.world)
    result.update(params=count_params(ph.model), test_accuracy=acc, test_loss=loss)
    spec = {"name": ph.plan.model.name, "args": ph.plan.model.args}
    if ph.cohort:
        result["members"] = {n: acc for n, (acc, _) in evaluate_members(
            ph.model, test_ds, ph.device, ph.rank, ph.world).items()}
        if ph.rank == 0:  # each member that stands alone, as its own checkpoint
            result["exports"] = {n: checkpoint_bytes(state, {"name": mc.name, "args": mc.args},
                                                     ph.info)
                                 for n, (mc, state) in ph.model.exports().items()}
            result["weights"] = next(iter(result["exports"].values()))
    elif ph.rank == 0:
        result["weights"] = checkpoint_bytes(ph.model.state_dict(), spec, ph.info)
    return result


def run_phase(loop: dict[str, Any], phase_id: int, coordinator,
              report_every_epoch: bool = False) -> dict[str, Any]:
    """Train one role (teacher, student or baseline) on this worker; see group.py.

    Rank 0 sends each epoch's metrics to the coordinator without waiting. Ray Train gets a
    report only when a checkpoint is due (``train.checkpoint_every`` epochs,
    ``train.checkpoint_seconds``, the last epoch) or on every epoch for a Tune trial, whose
    scheduler reads them. Returns (rank 0) the selected weights as safetensors bytes."""
    import ray.train
    import ray.train.torch

    started_at = time.time()
    ctx = ray.train.get_context()
    ph = setup_phase(loop, ctx.get_world_rank(), ctx.get_world_size(),
                     ray.train.torch.get_device())
    start_epoch, best, history = _resume_point(ph, loop, phase_id, coordinator)
    cfg, transfer = ph.cfg, ph.tset.indices
    sampler = torch.utils.data.DistributedSampler(range(len(transfer)), num_replicas=ph.world,
                                                  rank=ph.rank, shuffle=True, seed=cfg.train.seed)
    global_step = start_epoch * -(-len(transfer) // (ph.world * cfg.train.batch_size))
    checkpoints: list[int] = []
    keep_best = cfg.train.keep_checkpoint == "best"
    every, every_s = cfg.train.checkpoint_every, cfg.train.checkpoint_seconds
    last_checkpoint_at = time.monotonic()
    for epoch in range(start_epoch, ph.plan.epochs):
        t0 = time.perf_counter()
        sums, global_step, pretrain = train_epoch(ph, epoch, sampler, global_step)
        clock_due = (ph.rank == 0 and every_s is not None
                     and time.monotonic() - last_checkpoint_at >= every_s)
        metrics, reduced = epoch_metrics(ph, epoch, sums, t0, pretrain, clock_due)
        if keep_best and _better(metrics, best):  # "last" needs no copy: it is the model
            best = {"epoch": epoch, "val_accuracy": metrics["val_accuracy"],
                    "val_loss": metrics["val_loss"],
                    "state": {k: v.detach().clone() for k, v in ph.model.state_dict().items()}}
        metrics.update(best_epoch=best["epoch"] if best else epoch, _ended_at=time.time())
        history.append(metrics)
        if ph.rank == 0:  # fire and forget: the driver draws progress and logs to MLflow
            coordinator.epoch.remote(phase_id, metrics)
        due = (epoch + 1 == ph.plan.epochs or bool(every and (epoch + 1) % every == 0)
               or reduced["_due"] > 0)
        if due or report_every_epoch:
            report_epoch(ph, epoch, metrics, phase_id, best, history, due)
        if due:
            checkpoints.append(epoch)
            last_checkpoint_at = time.monotonic()
    return finish_phase(ph, best, {
        "history": history, "role": ph.plan.role, "transfer_size": len(transfer),
        "transfer": ph.tset.counts, "init_copied": ph.copied, "checkpoints": checkpoints,
        "started_at": started_at})
