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

from raykd import console
from raykd.errors import ConfigError
from raykd.train.storage import check_writable, default_root, in_ray_package, redact  # noqa: F401

DEFAULT_DB = "mlflow.db"

_TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".txt", ".md")


def has_secret(uri: str) -> bool:
    return redact(uri) != uri


def resolve_tracking_uri(uri: str | None, base: Path | None = None) -> str:
    """An absolute tracking URI: workers run in other working directories, so a relative sqlite
    path or bare folder would silently point somewhere else there. Unset: $MLFLOW_TRACKING_URI
    (MLflow's own variable; a Ray job gets it from its runtime env), else a sqlite file in the
    working directory — in ~/.raykd inside a Ray job package, which Ray deletes
    (raykd/train/storage.py)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    base = Path(base or os.getcwd())
    if not uri:
        folder = default_root() if in_ray_package() else base
        return f"sqlite:///{(folder / DEFAULT_DB).resolve()}"
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


def check_tracking(uri: str, connect_s: float = 5.0, answer_s: float = 60.0) -> None:
    """One clear line naming ``tracking.uri`` (a :class:`ConfigError`) when the tracking store
    cannot be used: a server that takes no connection within ``connect_s``, does not answer
    within ``answer_s`` (a server's first request creates its store: seconds) or refuses the
    credentials; a sqlite file whose folder cannot be written. MLflow's own client retries an
    unreachable server for minutes and then fails with a traceback."""
    if uri.startswith("sqlite:///"):
        return check_writable(str(Path(uri.removeprefix("sqlite:///")).parent), "tracking.uri",
                              "give a sqlite file in a folder you can write or an MLflow "
                              "server (http://HOST:5000)")
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    shown = redact(uri)
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:  # reachable at all: quick, whatever the server
        socket.create_connection((host, port), timeout=connect_s).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConfigError(f"tracking.uri: cannot reach the MLflow server at {shown} "
                          f"({reason}); start it or fix tracking.uri") from None
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    probe = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/")
                                     + "/api/2.0/mlflow/experiments/get-by-name",
                                     "experiment_name=Default", ""))
    request = urllib.request.Request(probe)
    user = parts.username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = parts.password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        basic = base64.b64encode(f"{urllib.parse.unquote(user)}:"
                                 f"{urllib.parse.unquote(password)}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=answer_s):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ConfigError(f"tracking.uri: the MLflow server at {shown} refused access "
                              f"(HTTP {err.code}); give its credentials in "
                              f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        return  # it answered: an MLflow server (404 for a missing experiment) or a proxy
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"tracking.uri: the MLflow server at {shown} took the connection but "
                          f"did not answer ({redact(str(reason))}); check that it is an MLflow "
                          f"server and that it runs") from None


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """One ``MlflowClient`` per tracking URI for the process: each new client of a sqlite store
    opens its own engine and checks the schema again."""
    console.configure()
    if has_secret(uri):  # MLflow prints "View run at <the URI>", password included
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.startswith("sqlite:///"):  # sqlite creates the file, not its folder (~/.raykd)
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
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
    items = [Param(k, redact(v)[:6000]) for k, v in flat.items()]
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
    text = json.dumps(data, default=str)
    client(uri).log_dict(run_id, json.loads(redact(text)) if has_secret(text) else data, name)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    client(uri).log_text(run_id, redact(text), name)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None
                 ) -> None:
    path = Path(path)
    if path.suffix in _TEXT_SUFFIXES and path.stat().st_size < 1 << 20:
        text = path.read_text(errors="replace")
        if has_secret(text):  # a config with a password in a URI: upload a masked copy
            with tempfile.TemporaryDirectory() as tmp:
                masked = Path(tmp) / path.name
                masked.write_text(redact(text))
                client(uri).log_artifact(run_id, str(masked), artifact_path)
            return
    client(uri).log_artifact(run_id, str(path), artifact_path)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, redact(str(value)))


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
        _log_export_error(uri, run_id, name, err)
        return None
    finally:
        mlflow.set_tracking_uri(prev)


def _log_export_error(uri: str, run_id: str, name: str, err: Exception) -> None:
    """Why a model could not be logged, as an artifact beside the weights."""
    with tempfile.TemporaryDirectory() as tmp:
        note = Path(tmp) / f"{name}_export_error.txt"
        note.write_text(f"{type(err).__name__}: {err}\n")
        log_artifact(uri, run_id, note)


def log_hf_model(uri: str, run_id: str, model, tokenizer_file: str, name: str) -> str | None:
    """Log a Hugging Face causal LM with its tokenizer as an MLflow ``transformers`` model
    (``text-generation``; weights as safetensors via save_pretrained, no pickle), so
    ``mlflow.transformers.load_model(uri)`` gives back a generation pipeline. Returns the
    logged model's URI, or None when logging failed (the reason is logged)."""
    import logging

    import mlflow
    from transformers.utils import logging as hf_logging

    from raykd.data.tokenizer import hf_tokenizer
    from raykd.models.hf import plain_forward

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar in the user's console
    # MLflow looks for a hub model card and licence of a model that never came from the hub
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    prev = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with plain_forward(model.eval().cpu()) as plain, \
                mlflow.start_run(run_id=run_id, nested=True):
            plain.config.use_cache = True  # generation reuses past keys
            info = mlflow.transformers.log_model(
                {"model": plain, "tokenizer": hf_tokenizer(tokenizer_file)}, name=name,
                task="text-generation", pip_requirements=_model_requirements(
                    ("transformers", "tokenizers", "safetensors")))
        return info.model_uri
    except Exception as err:  # keep the weights (logged beside) whatever MLflow thinks
        _log_export_error(uri, run_id, name, err)
        return None
    finally:
        mlflow.set_tracking_uri(prev)


def _model_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "mlflow", "numpy", *extra)]


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
