"""Turn teacher sources (checkpoint paths or MLflow URIs) into models."""

from __future__ import annotations

import torch
from torch import nn

from raykd.config import URI_SCHEMES, RaykdConfig


def local_checkpoint(source: str, tracking_uri: str) -> str:
    """A local path for ``source``; MLflow URIs (runs:/, models:/) are downloaded first."""
    if source.startswith(URI_SCHEMES):
        from raykd.tracking import download

        return str(download(tracking_uri, source))
    from pathlib import Path

    from raykd.node_files import require

    # a save_pretrained folder (transformers) or a checkpoint file; a missing one names this node
    kind = "file" if Path(source).suffix else "folder"
    return str(require(source, "teacher.checkpoint", kind))


def load_teacher_models(sources: list[str], cfg: RaykdConfig, info, tracking_uri: str
                        ) -> list[nn.Module]:
    from raykd.train.checkpoint import load_model

    return [load_model(local_checkpoint(src, tracking_uri), cfg.teacher, info, field="teacher")
            for src in sources]


def ensemble_logits(models: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The teacher's raw float32 logits on the CPU: one model's, or the mean of an ensemble's
    raw logits (consistent under any read-time temperature). ``x`` on the models' device."""
    with torch.inference_mode():
        if len(models) == 1:
            logits = models[0](x)
        else:
            logits = torch.stack([m(x) for m in models]).mean(0)
        return logits.float().cpu()
