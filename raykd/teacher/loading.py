"""Turn teacher sources (checkpoint paths or MLflow URIs) into models."""

from __future__ import annotations

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
