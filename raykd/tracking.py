"""MLflow tracking: one place that knows the URI, the run hierarchy and what gets logged.

Only the driver and rank 0 talk to MLflow. Workers get an absolute URI and a run id and log through
``MlflowClient`` so they never depend on a process-global active run.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(uri: str | None, base: Path | None = None) -> str:
    """An absolute tracking URI: workers run in other working directories, so a relative sqlite
    path or bare folder would silently point somewhere else there."""
    base = Path(base or os.getcwd())
    if not uri:
        return f"sqlite:///{(base / DEFAULT_DB).resolve()}"
    if uri.startswith(("http://", "https://", "databricks")):
        return uri
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return uri if path.startswith("/") else f"sqlite:///{(base / path).resolve()}"
    if uri.startswith("file:"):
        return uri
    if "://" not in uri:  # a bare path means a sqlite file there
        return f"sqlite:///{(base / uri).resolve()}"
    return uri


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """One ``MlflowClient`` per tracking URI for the process: each new client of a sqlite store
    opens its own engine and checks the schema again."""
    from raykd import console

    console.configure()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, item in enumerate(value):
            flatten(f"{prefix}.{i}", item, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return out


def search_runs(uri: str, experiment: str, filter_string: str, **kwargs) -> list:
    """Runs of the experiment named ``experiment`` matching ``filter_string`` (MLflow search
    syntax; ``kwargs`` go to ``MlflowClient.search_runs``); [] when no such experiment exists."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(c.search_runs([exp.experiment_id], filter_string=filter_string, **kwargs))


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


def start_run(uri: str, experiment: str, name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Create a run (nested under ``parent_run_id`` when given) and return its id."""
    all_tags = {"mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(uri).create_run(experiment_id(uri, experiment), tags=all_tags, run_name=name)
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


@contextmanager
def tracked_run(uri: str, experiment: str, name: str, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None) -> Iterator[str]:
    """A run that is marked FAILED (not left RUNNING) when the body raises."""
    run_id = start_run(uri, experiment, name, parent_run_id, tags)
    try:
        yield run_id
    except KeyboardInterrupt:
        end_run(uri, run_id, "KILLED")
        raise
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    end_run(uri, run_id)


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    flat = flatten("", dict(params), {})
    items = [Param(k, v[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client(uri).log_batch(run_id, params=items[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None
                ) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, int | float)]
    if items:
        client(uri).log_batch(run_id, metrics=items)


def log_epochs(uri: str, run_id: str, epochs: list[Mapping[str, float]]) -> None:
    """Several epochs' metrics in one call, each at ``step = epoch``; keys starting with ``_``
    (timestamps) stay out of MLflow."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(m["epoch"])) for m in epochs for k, v in m.items()
             if not k.startswith("_") and isinstance(v, int | float)]
    for i in range(0, len(items), 1000):  # MLflow caps a batch at 1000 metrics
        client(uri).log_batch(run_id, metrics=items[i:i + 1000])


def log_dict(uri: str, run_id: str, data: Any, name: str) -> None:
    client(uri).log_dict(run_id, data, name)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    client(uri).log_text(run_id, text, name)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None
                 ) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


def log_torch_model(uri: str, run_id: str, model, example, name: str) -> str | None:
    """Log ``model`` as an MLflow PyTorch model in torch.export (pt2) form — loadable without
    unpickling arbitrary code — with an input example so MLflow can infer the signature.
    Returns the logged model's URI, or None when the export failed (the reason is logged)."""
    import mlflow

    model = model.eval().cpu()
    prev = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id, nested=True):
            # Pinned requirements instead of MLflow's inference, which reloads the model in a
            # subprocess (and runs `uv export` in a uv project): seconds per model, every fit.
            info = mlflow.pytorch.log_model(model, name=name, serialization_format="pt2",
                                            input_example=example.cpu().numpy(),
                                            pip_requirements=_model_requirements())
        return info.model_uri
    except Exception as err:  # export can fail for exotic models: keep the weights regardless
        with tempfile.TemporaryDirectory() as tmp:
            note = Path(tmp) / f"{name}_export_error.txt"
            note.write_text(f"{type(err).__name__}: {err}\n")
            log_artifact(uri, run_id, note)
        return None
    finally:
        mlflow.set_tracking_uri(prev)


def _model_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "mlflow", "numpy")]


def download(uri: str, artifact_uri: str) -> Path:
    """Fetch an MLflow artifact URI (runs:/..., models:/...) to a local path."""
    import mlflow

    if not artifact_uri.startswith("models:/"):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri,
                                                        tracking_uri=uri))
    # models:/ is resolved through the model REGISTRY (and MLflow 3's logged models), which
    # download_artifacts takes from the GLOBAL URIs, not from tracking_uri — left unset, they
    # default to ./mlflow.db, which the lookup creates. Point both at `uri` for this call.
    prev_tracking, prev_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri,
                                                        tracking_uri=uri))
    finally:
        mlflow.set_tracking_uri(prev_tracking)
        mlflow.set_registry_uri(prev_registry)


def register_model(uri: str, model_uri: str, name: str, tags: Mapping[str, Any]) -> dict:
    """A new version of registered model ``name`` (created if absent) from a logged model,
    tagged; returns {name, version, model_uri} where model_uri is models:/NAME/VERSION."""
    import mlflow

    # register_model reads the GLOBAL registry URI (see download): point it at ``uri``.
    prev_tracking, prev_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        version = mlflow.register_model(model_uri, name,
                                        tags={k: str(v) for k, v in tags.items()})
    finally:
        mlflow.set_tracking_uri(prev_tracking)
        mlflow.set_registry_uri(prev_registry)
    return {"name": name, "version": int(version.version),
            "model_uri": f"models:/{name}/{version.version}"}
