"""Turn teacher sources (checkpoint paths or MLflow URIs) into models."""

from __future__ import annotations

from torch import nn

from raykd.config import URI_SCHEMES, RaykdConfig


def local_checkpoint(source: str, tracking_uri: str) -> str:
    """A local path for ``source``; MLflow URIs (runs:/, models:/) are downloaded first."""
    if source.startswith(URI_SCHEMES):
        from raykd.tracking import download

        return str(download(tracking_uri, source))
    from raykd.train.storage import require_on_node

    require_on_node(source, "teacher.checkpoint")  # a path the driver checked, maybe elsewhere
    return source


def load_teacher_models(sources: list[str], cfg: RaykdConfig, info, tracking_uri: str
                        ) -> list[nn.Module]:
    from raykd.train.checkpoint import load_model

    return [load_model(local_checkpoint(src, tracking_uri), cfg.teacher, info, field="teacher")
            for src in sources]
