"""The transfer set of one fit: which train samples it learns from, and with which targets.

Fully labelled data (the default): the whole train split for the teacher and the baseline, the
student's ``distill.include_classes`` / ``exclude_classes`` filter for the student.

With ``data.labelled`` (see :mod:`raykd.data.labelled`), training reads the train split with the
pool's labels hidden. A fit without a teacher learns the labelled part alone. A fit with a teacher
learns the labelled part and the pool samples whose teacher confidence (max probability at T=1)
reaches ``distill.confidence_threshold``, with per-sample targets:

- hard labels (what ``ce`` reads): the label on labelled rows, the teacher's argmax on pool rows;
- soft targets (what ``kd`` and the other logit terms read): the label as a one-hot distribution
  on labelled rows (Noisy Student learns labelled data from its labels, not the teacher); on pool
  rows the teacher's logits (``pseudo_labels: soft``) or its argmax one-hot (``hard``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raykd.config import RaykdConfig

# A one-hot target as logits: 0 on the class, this elsewhere. Finite (terms other than kd need no
# -inf handling) and still exactly 0 probability after softmax at any temperature below 10^4.
_OFF = -1e8


@dataclass
class TransferSet:
    dataset: object  # IndexedDataset as training reads it (pool labels hidden)
    indices: torch.Tensor  # train positions this fit learns from
    pool: torch.Tensor | None = None  # bool [N]: True where the label is hidden
    pseudo_labels: str = "soft"
    counts: dict[str, int] = field(default_factory=dict)

    def targets(self, idx: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hard labels, soft-target logits) for a batch; see the module docstring."""
        if self.pool is None or t_logits is None:
            return y, t_logits
        in_pool = self.pool[idx]
        y = torch.where(in_pool, t_logits.argmax(-1), y)
        one_hot = torch.full_like(t_logits, _OFF).scatter_(-1, y[:, None], 0.0)
        if self.pseudo_labels == "hard":
            return y, one_hot
        return y, torch.where(in_pool[:, None], t_logits, one_hot)


def pool_confidence(cached, pool: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """The teacher's max probability (T=1) on each pool sample, from its cache."""
    out = [torch.softmax(cached.logits(part, 0), -1).amax(-1) for part in pool.split(chunk)]
    return torch.cat(out) if out else torch.empty(0)


def transfer_set(cfg: RaykdConfig, role: str, cached=None) -> TransferSet:
    """What a fit of ``role`` learns from; ``cached``: the student's cached teacher, if any."""
    from raykd.data import build_dataset
    from raykd.data.labelled import labelled_split, training_view

    train = build_dataset(cfg.data, "train")
    if cfg.data.labelled is None:
        indices = (train.subset_indices(cfg.distill.include_classes,
                                        cfg.distill.exclude_classes)
                   if role == "student" else torch.arange(len(train)))
        return TransferSet(train, indices, counts={"labelled": len(indices)})
    labelled, pool = labelled_split(cfg.data)
    view = training_view(cfg.data)
    hidden = torch.zeros(len(train), dtype=torch.bool)
    hidden[pool] = True
    counts = {"labelled": len(labelled), "pool": len(pool), "pseudo_labelled": 0}
    if role != "student" or cached is None:
        return TransferSet(view, labelled, hidden, counts=counts)
    confident = pool[pool_confidence(cached, pool) >= cfg.distill.confidence_threshold]
    counts["pseudo_labelled"] = len(confident)
    indices = torch.sort(torch.cat([labelled, confident])).values
    return TransferSet(view, indices, hidden, cfg.distill.pseudo_labels, counts)
