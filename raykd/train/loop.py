"""The per-worker training loop, one function for teacher, student and baseline runs.

Each Ray Train worker builds its own data and model from the validated config (nothing large
travels in the config), takes its DistributedSampler share of the transfer set, and per step looks
up the teacher's cached logits for the batch's sample indices locally. Rank 0 logs to MLflow,
prints one line per epoch and writes the checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raykd.config import DistillConfig, LossTermConfig, ModelConfig, RaykdConfig, validate
from raykd.train.collective import all_reduce_sum
from raykd.train.evaluate import evaluate, evaluate_members, evaluate_split  # noqa: F401


@dataclass(frozen=True)
class RolePlan:
    """What differs between training the teacher, the student and the baseline."""

    role: str
    model: ModelConfig
    distill: DistillConfig
    epochs: int
    lr: float
    jitter: int

    @staticmethod
    def of(cfg: RaykdConfig, role: str) -> RolePlan:
        hard_labels = DistillConfig(losses=[LossTermConfig(name="ce")])
        if role == "teacher":
            return RolePlan(role, cfg.teacher, hard_labels, cfg.teacher.epochs or cfg.train.epochs,
                            cfg.teacher.lr or cfg.train.lr, cfg.teacher.jitter)
        distill = cfg.distill if role == "student" else hard_labels
        return RolePlan(role, cfg.student, distill, cfg.train.epochs, cfg.train.lr,
                        cfg.train.jitter)


class DistillStep(nn.Module):
    """Student forward (features taken by hooks) + loss in one module, so DDP sees every learned
    parameter — the student's and the loss terms' regressors — inside its forward."""

    def __init__(self, student: nn.Module, loss: nn.Module, paths: list[str], precision=None):
        super().__init__()
        from raykd.models.hooks import FeatureHooks
        from raykd.train.precision import Precision

        self.student, self.loss = student, loss
        self.precision = precision or Precision("fp32", "cpu")
        self._hooks = FeatureHooks(student, paths, "student").__enter__() if paths else None

    def forward(self, x, t_logits, y, t_feats, epoch: int, pretrain: bool, mask=None,
                t_topk=None):
        with self.precision.autocast():  # train.precision: see raykd/train/precision.py
            logits = self.student(x)
        # Language models: top-1 agreement with the teacher (its cached top-1, or its argmax
        # in live mode), read by the loop after the step.
        self.agreement = None
        top1 = t_topk.ids[..., 0] if t_topk is not None else (
            t_logits.argmax(-1) if t_logits is not None and t_logits.dim() == 3 else None)
        if top1 is not None and mask is not None:
            from raykd.train.lm_eval import agreement_sums

            with torch.no_grad():
                self.agreement = agreement_sums(logits, top1, mask)
        s_feats = dict(self._hooks.features) if self._hooks else {}
        if self.precision.dtype is not None:  # the loss in float32
            from raykd.train.precision import to_float32

            logits, s_feats = to_float32(logits), to_float32(s_feats)
        with self.precision.full():
            total, parts = self.loss(logits, t_logits, y, s_feats, t_feats, mask=mask,
                                     epoch=epoch, pretrain=pretrain, teacher_topk=t_topk)
        return total, parts


def _topk_to(topk, device):
    """A batch's TokenTopK on the training device."""
    import dataclasses

    return dataclasses.replace(topk, values=topk.values.to(device), ids=topk.ids.to(device),
                               tail_logmass=topk.tail_logmass.to(device))


def _make_optimizer(params, cfg: RaykdConfig, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=t.weight_decay)


def _restore(model, loss, optimizer, scheduler, phase_id: int, resume_from=None, rank: int = 0,
             device=None, precision=None):
    """Resume after a worker failure from Ray Train's latest checkpoint when it belongs to this
    phase (else from ``resume_from``, a checkpoint handed in by a Tune trial): the student, the
    loss's learned modules, optimiser, LR schedule and this rank's RNG (raykd.train.state).
    Returns (:class:`~raykd.train.state.Restored` or None, whether it follows a failure)."""
    import ray.train

    from raykd.train.state import read_phase, read_state

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if read_phase(d) != phase_id:
                ckpt = None  # an earlier phase's checkpoint: this phase starts afresh
    after_failure = ckpt is not None
    ckpt = ckpt or resume_from
    if ckpt is None:
        return None, False
    with ckpt.as_directory() as d:
        return read_state(d, rank=rank, model=model, loss=loss, optimizer=optimizer,
                          scheduler=scheduler, device=device, precision=precision), after_failure


def _save(model, loss, optimizer, scheduler, spec: dict, info, epoch: int, metrics: dict,
          phase_id: int, best: dict | None, history: list, rank: int = 0, device=None,
          precision=None):
    """Every rank's checkpoint folder (Ray Train merges them): see raykd.train.state."""
    import ray.train

    from raykd.train.state import write_state

    tmp = tempfile.mkdtemp(prefix="raykd-ckpt-")
    write_state(tmp, rank=rank, model=model, loss=loss, optimizer=optimizer,
                scheduler=scheduler, spec=spec, info=info, epoch=epoch, metrics=metrics,
                phase_id=phase_id, best=best, history=history, device=device,
                precision=precision)
    return ray.train.Checkpoint.from_directory(tmp)


def _better(metrics: dict[str, float], best: dict | None) -> bool:
    """Higher validation accuracy wins; a tie goes to the lower validation loss."""
    if best is None:
        return True
    key = (metrics["val_accuracy"], -metrics["val_loss"])
    return key > (best["val_accuracy"], -best["val_loss"])


def run_phase(loop: dict[str, Any], phase_id: int, coordinator,
              report_every_epoch: bool = False) -> dict[str, Any]:
    """Train one role (teacher, student or baseline) on this worker; see group.py.

    Rank 0 sends each epoch's metrics to the coordinator without waiting. Ray Train gets a
    report only when a checkpoint is due (``train.checkpoint_every`` epochs,
    ``train.checkpoint_seconds``, the last epoch) or on every epoch for a Tune trial, whose
    scheduler reads them. Returns (rank 0) the selected weights as safetensors bytes."""
    import ray.train
    import ray.train.torch

    from raykd.data import build_dataset
    from raykd.data.augment import augment
    from raykd.losses import DistillLoss
    from raykd.models import build_model, count_params
    from raykd.models.hooks import probe_shapes
    from raykd.teacher.client import (CachedTeacher, LiveTeacher, replay_inputs, replay_view,
                                      shard_local_order)
    from raykd.train.checkpoint import checkpoint_bytes

    started_at = time.time()
    cfg, role = validate(loop["config"]), loop["role"]  # files: checked by the driver
    plan = RolePlan.of(cfg, role)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank, every phase

    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    info = train_ds.info
    field = "teacher" if role == "teacher" else "student"
    cohort = role == "student" and cfg.online is not None and cfg.online.scheme != "codistill"
    if cohort:  # online distillation: every member in one module (raykd.models.cohort)
        from raykd.models.cohort import build_cohort

        model = build_cohort(cfg, info)
    else:
        model = build_model(plan.model, info, field=field)
    copied: list[str] = []
    if loop.get("init_from") and role == "student":
        from raykd.models.init import init_student_from_teacher
        from raykd.teacher.loading import local_checkpoint
        from raykd.train.checkpoint import load_model

        teacher_src = local_checkpoint(loop["init_from"], loop.get("tracking_uri") or "")
        copied = init_student_from_teacher(model, load_model(teacher_src, cfg.teacher, info))
    model.to(device)

    handoff = loop.get("teacher") if role == "student" else None
    s_paths = plan.distill.layer_paths("student")
    _, example, _ = train_ds.get_batch(torch.arange(min(2, len(train_ds))))
    s_shapes = probe_shapes(model, s_paths, example.to(device), "student") if s_paths else {}
    t_shapes = {p: torch.Size(s) for p, s in (handoff.feature_shapes if handoff else {}).items()}
    loss = DistillLoss(plan.distill, s_shapes, t_shapes).to(device)
    from raykd.train.precision import Precision

    precision = Precision(cfg.train.precision, device)
    step = ray.train.torch.prepare_model(
        DistillStep(model, loss, s_paths, precision),
        parallel_strategy_kwargs={"find_unused_parameters": loss.pretrain_epochs > 0})
    optimizer = _make_optimizer(list(step.parameters()), cfg, plan.lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, plan.epochs)
                 if cfg.train.schedule == "cosine" else None)
    restored, after_failure = _restore(model, loss, optimizer, scheduler, phase_id,
                                       loop.get("resume_from"), rank, device, precision)
    start_epoch, best = (restored.next_epoch, restored.best) if restored else (0, None)
    if scheduler and not (restored and restored.scheduler_restored):
        for _ in range(start_epoch):  # a checkpoint written before schedules were saved
            scheduler.step()
    if after_failure and rank == 0:  # epochs lost and time to recover (raykd.train.group)
        # waited for: the coordinator is threaded, so a call not waited for could land after
        # this phase's finish() and the recovery would be missing from its result
        ray.get(coordinator.resumed.remote(phase_id, start_epoch, time.time(),
                                           restored.last_ended_at))

    cached = live = None
    if handoff is not None and handoff.mode == "live":
        live = LiveTeacher(handoff, plan.distill.layer_paths("teacher"))
    elif handoff is not None and handoff.per_token:  # language models: per-token top-k
        from raykd.config import ConfigError
        from raykd.teacher.client import TokenCachedTeacher

        if handoff.spec.dataset_identity != info.identity:  # other tokens than the cache's
            raise ConfigError(f"data.tokenizer_dir: this worker's token blocks ({info.identity}) "
                              f"are not the teacher cache's ({handoff.spec.dataset_identity}); "
                              f"on several nodes put data.tokenizer_dir (or data.tokenizer) "
                              f"on storage every node reads")
        cached = TokenCachedTeacher(handoff)
    elif handoff is not None:
        cached = CachedTeacher(handoff)
    replay = handoff is not None and handoff.mode == "replay"
    views = handoff.spec.views if replay else 1

    from raykd.train.transfer import transfer_set

    tset = transfer_set(cfg, role, cached)
    train_ds, transfer = tset.dataset, tset.indices  # with data.labelled: pool labels hidden
    augment_v2 = None
    transforms = cfg.teacher.augment if role == "teacher" else cfg.train.augment
    if transforms:
        from raykd.data.augment import build_transform

        augment_v2 = build_transform(transforms)
    sampler = torch.utils.data.DistributedSampler(range(len(transfer)), num_replicas=world,
                                                  rank=rank, shuffle=True, seed=cfg.train.seed)
    codistill = None  # codistillation: stale copies of the other groups (raykd.train.stale_peers)
    if loop.get("codistill"):
        from raykd.train.stale_peers import StalePeers

        codistill = StalePeers(loop["codistill"], cfg, info, device, rank, world)
    global_step = start_epoch * -(-len(transfer) // (world * cfg.train.batch_size))
    history: list[dict[str, float]] = list(restored.history) if restored else []
    checkpoints: list[int] = []
    spec = {"name": plan.model.name, "args": plan.model.args}
    bs, keep_best = cfg.train.batch_size, cfg.train.keep_checkpoint == "best"
    every, every_s = cfg.train.checkpoint_every, cfg.train.checkpoint_seconds
    last_checkpoint_at = time.monotonic()
    for epoch in range(start_epoch, plan.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        order = transfer[torch.tensor(list(sampler), dtype=torch.long)]
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch)
        if cached is not None:
            order = shard_local_order(order, cached, gen)
        batches = order.split(bs)
        pretrain = epoch < loss.pretrain_epochs
        sums = {"loss": 0.0, "n": 0.0}
        step.train()
        for b, idx in enumerate(batches):
            idx, x, y = train_ds.get_batch(idx)
            view: torch.Tensor | int = 0
            if replay:  # the cached view whose labels this sample gets this epoch, rendered
                view = replay_view(idx, epoch, views, cfg.train.seed)
                x = replay_inputs(x, idx, view, cfg.train.seed, cfg.train.jitter, cfg.train.flip)
            elif plan.jitter or (role != "teacher" and cfg.train.flip):
                seeds = torch.randint(0, 2**62, (len(idx),), generator=gen)
                x = augment(x, seeds, plan.jitter, cfg.train.flip and role != "teacher")
            if augment_v2 is not None:  # never after a replayed view: a config error
                from raykd.data.augment import apply_transform

                x = apply_transform(x, torch.randint(0, 2**62, (len(idx),), generator=gen),
                                    augment_v2)
            t_logits, t_feats, t_topk = None, {}, None
            if cached is not None and handoff.per_token:
                t_topk = _topk_to(cached.topk(idx), device)
            elif cached is not None:
                t_logits = cached.logits(idx, view)
                if b + 1 < len(batches):
                    cached.prefetch(batches[b + 1])
                y, t_logits = tset.targets(idx, y, t_logits)
            elif live is not None:
                t_logits, t_feats = live.forward(x)
            x, y = x.to(device), y.to(device)
            t_logits = t_logits.to(device) if t_logits is not None else None
            t_feats = {k: v.to(device) for k, v in t_feats.items()}
            if codistill is not None:
                t_logits = codistill.targets(x, global_step)
            mask = (y != -100) if y.dim() == 2 else None  # token blocks: padding is -100
            total, parts = step(x, t_logits, y, t_feats, epoch, pretrain, mask, t_topk)
            optimizer.zero_grad(set_to_none=True)
            precision.backward_step(total, optimizer)  # total.backward(); optimizer.step()
            global_step += 1
            if codistill is not None:
                codistill.after_step(model, global_step)
            n = float(len(idx))
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
        if scheduler:
            scheduler.step()
        last = epoch + 1 == plan.epochs
        # Rank 0's clock decides a time-based checkpoint; the sum hands its decision to every
        # rank, because a Ray Train report is a barrier that all ranks must reach together.
        sums["_due"] = float(rank == 0 and every_s is not None
                             and time.monotonic() - last_checkpoint_at >= every_s)
        keys = sorted(sums)
        reduced = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], world),
                           strict=True))
        seconds = time.perf_counter() - t0
        metrics = {("train_loss" if k == "loss" else k): v / max(reduced["n"], 1)
                   for k, v in reduced.items() if not k.startswith("_") and k != "n"}
        t1 = time.perf_counter()
        val_acc, val_loss = evaluate_split(model, val_ds, device, rank, world)
        if cohort:  # each member's curve, for its own MLflow run
            for name, (acc, ce) in evaluate_members(model, val_ds, device, rank, world).items():
                metrics.update({f"{name}_val_accuracy": acc, f"{name}_val_loss": ce})
        metrics.update(val_accuracy=val_acc, val_loss=val_loss, epoch=epoch,
                       epoch_seconds=seconds, eval_seconds=time.perf_counter() - t1,
                       samples_per_s=reduced["n"] / max(seconds, 1e-9), pretrain=float(pretrain))
        if "_tokens" in reduced:  # language models: val_loss is in nats per token
            from raykd.train.lm_eval import perplexity

            metrics.update(val_perplexity=perplexity(val_loss),
                           tokens_per_s=reduced["_tokens"] / max(seconds, 1e-9))
            if "_agree_n" in reduced:
                metrics["teacher_agreement"] = reduced["_agree"] / max(reduced["_agree_n"], 1)
        if keep_best and _better(metrics, best):  # "last" needs no copy: it is the model
            best = {"epoch": epoch, "val_accuracy": val_acc, "val_loss": val_loss,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        metrics.update(best_epoch=best["epoch"] if best else epoch, _ended_at=time.time())
        history.append(metrics)
        if rank == 0:  # fire and forget: the driver draws progress and logs to MLflow
            coordinator.epoch.remote(phase_id, metrics)
        due = last or bool(every and (epoch + 1) % every == 0) or reduced["_due"] > 0
        if due or report_every_epoch:
            checkpoint = None
            if due:
                checkpoint = _save(model, loss, optimizer, scheduler, spec, info, epoch,
                                   metrics, phase_id, best, history, rank, device, precision)
            if due:
                checkpoints.append(epoch)
                last_checkpoint_at = time.monotonic()
            # the temp folder goes once uploaded (every rank writes one per checkpoint)
            ray.train.report({k: v for k, v in metrics.items() if not k.startswith("_")},
                             checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
    if cached is not None:
        cached.close()
    kept_epoch = plan.epochs - 1  # the last epoch, or the best one below
    if best is not None:
        model.load_state_dict(best["state"])
        kept_epoch = best["epoch"]
    test_acc, test_loss = evaluate_split(model, build_dataset(cfg.data, "test"), device, rank,
                                         world)
    result = {"history": history, "params": count_params(model), "role": role,
              "transfer_size": len(transfer), "transfer": tset.counts, "init_copied": copied,
              "best_epoch": kept_epoch,
              "test_accuracy": test_acc, "test_loss": test_loss, "checkpoints": checkpoints,
              "started_at": started_at}
    if cohort:
        test_ds = build_dataset(cfg.data, "test")
        result["members"] = {n: acc for n, (acc, _) in
                             evaluate_members(model, test_ds, device, rank, world).items()}
        if rank == 0:  # each member that stands alone, as its own checkpoint
            result["exports"] = {n: checkpoint_bytes(state, {"name": mc.name, "args": mc.args},
                                                     info)
                                 for n, (mc, state) in model.exports().items()}
            result["weights"] = next(iter(result["exports"].values()))
        return result
    if rank == 0:
        result["weights"] = checkpoint_bytes(model.state_dict(), spec, info)
    return result
