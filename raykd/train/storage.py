"""Where a job's files go: Ray Train checkpoints, fit weights, the teacher cache, Tune searches.

Resolved once, in the driver (the process ``raykd`` or ``ray job submit`` started), when the
config is loaded: ``train.storage_path``, ``teacher.cache_dir``, ``data.store_dir`` and
``tune.storage_path`` become absolute paths or URIs before any worker or actor sees them. Their
working directory is not the driver's: Ray Train moves every worker into a per-run folder of
Ray's, an actor runs in Ray's session folder, and on a cluster they are other machines.

Defaults live under one folder, ``.raykd/`` in the working directory. Inside a job submitted
with ``ray job submit --working-dir`` the working directory is Ray's unpacked copy of the
package, ``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>``: Ray owns
it, shares it between jobs submitted with the same files, deletes it when it evicts the package
and drops it with the session. There the defaults go under ``~/.raykd`` on the driver's node, so
a teacher cache is reused by the next job and checkpoints outlive the session. On a cluster of
several nodes ``train.storage_path`` must be storage every node reaches (a shared filesystem or
a URI such as s3://bucket/raykd): Ray Train writes each worker's checkpoint there.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

from raykd.errors import ConfigError

# user:password@ in a URI (a tracking server with basic auth, s3://KEY:SECRET@bucket): the
# password never reaches a print, a log line or MLflow; see redact().
_USERINFO = re.compile(r"""(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<secret>[^\s"'<>]+)@""")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URI in it masked."""
    return _USERINFO.sub(r"\g<head>:***@", text)


# The folder names Ray unpacks a job's working_dir under (its runtime_env constants and
# runtime_env/working_dir.py; not a public API, so only a hint for picking a default).
RAY_PACKAGE_DIRS = ("runtime_resources", "working_dir_files")


def in_ray_package(cwd: str | Path | None = None) -> bool:
    """Whether ``cwd`` (default: this process's) is Ray's unpacked copy of a job's working_dir."""
    parts = Path(cwd or os.getcwd()).parts
    return all(name in parts for name in RAY_PACKAGE_DIRS)


def default_root() -> Path:
    """``.raykd`` in the working directory, or in the home folder inside a Ray job package."""
    return (Path.home() if in_ray_package() else Path.cwd()) / ".raykd"


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str | None, default: str) -> str:
    """``path`` made absolute (against the working directory, ``~`` expanded), a URI as it is,
    or ``default_root() / default`` when unset."""
    if path is None:
        return str(default_root() / default)
    if is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def resolve_config(cfg):
    """``cfg`` with its storage fields resolved (see the module docstring); called once, by
    :func:`raykd.config.load_config` in the driver."""
    if cfg.teacher.cache_dir is not None and is_uri(cfg.teacher.cache_dir):
        raise ConfigError(f"teacher.cache_dir: {cfg.teacher.cache_dir!r} is a URI, but the cache "
                          f"is read from the files of a folder; give a local or shared folder")
    if cfg.data.store_dir is not None and is_uri(cfg.data.store_dir):
        raise ConfigError(f"data.store_dir: {cfg.data.store_dir!r} is a URI, but the data store "
                          f"is read with positioned reads from files; give a local or shared "
                          f"folder")
    teacher = {"cache_dir": str(cache_dir(cfg))}
    if cfg.teacher.tokenizer:  # read by the teacher actor, whose working directory is Ray's
        teacher["tokenizer"] = resolve(cfg.teacher.tokenizer, "")
    update = {"train": cfg.train.model_copy(update={"storage_path": train_storage(cfg)}),
              "teacher": cfg.teacher.model_copy(update=teacher),
              "data": cfg.data.model_copy(update={"store_dir": resolve(cfg.data.store_dir,
                                                                       "data")})}
    if cfg.data.name == "text":  # the corpus, its tokenizer and where a trained one is kept
        update["data"] = update["data"].model_copy(update={
            "path": resolve(cfg.data.path, "data"),
            "tokenizer": _text_tokenizer(cfg),
            "tokenizer_dir": (resolve(cfg.data.tokenizer_dir, "") if cfg.data.tokenizer_dir
                              else str(cache_dir(cfg) / "tokenizers"))})
    if cfg.tune is not None:
        update["tune"] = cfg.tune.model_copy(
            update={"storage_path": resolve(cfg.tune.storage_path, "tune")})
    return cfg.model_copy(update=update)


def _text_tokenizer(cfg) -> str | None:
    """``data.tokenizer`` made absolute; unset, the teacher's own when its checkpoint is a
    save_pretrained folder that holds a tokenizer.json (a trained BPE otherwise) — unless
    ``teacher.tokenizer`` says the teacher's tokens are not the student's."""
    if cfg.data.tokenizer:
        return resolve(cfg.data.tokenizer, "")
    if cfg.teacher.tokenizer:
        return None
    source = cfg.teacher.checkpoint
    if source and not is_uri(source) and (Path(source) / "tokenizer.json").is_file():
        return resolve(source, "")
    return None


def train_storage(cfg) -> str:
    """Ray Train's ``RunConfig.storage_path`` for this config: a folder or a URI."""
    return resolve(cfg.train.storage_path, "runs")


def weights_dir(cfg) -> Path:
    """The driver's local folder for the weights each fit returns (as bytes, through the object
    store): the storage folder itself when it is local, else ``runs`` under the default root."""
    storage = train_storage(cfg)
    if storage.startswith("file://"):
        return Path(storage.removeprefix("file://"))
    return Path(resolve(None, "runs") if is_uri(storage) else storage)


def cache_dir(cfg) -> Path:
    """The teacher cache's folder (files read by position: a path, not a URI)."""
    return Path(resolve(cfg.teacher.cache_dir, "cache"))


# -- checks before anything starts --------------------------------------------------------------

FOLDER_HINT = "give a folder you can write, a shared filesystem path or a URI such as " \
              "s3://bucket/raykd"


def check_writable(path: str, field: str, hint: str = FOLDER_HINT,
                   timeout_s: float = 20.0) -> None:
    """Raise a one-line :class:`ConfigError` naming ``field`` when ``path`` cannot be written:
    a local folder (or the nearest existing folder above it) is probed with a temporary file;
    a URI is probed through pyarrow, as Ray Train will write it, with a time limit."""
    if is_uri(path) and not path.startswith("file://"):
        return _check_uri(path, field, timeout_s)
    folder = Path(path.removeprefix("file://"))
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{field}: {probe} is a file, not a folder, so {folder} cannot be "
                          f"created; {hint}")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".raykd-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"{field}: cannot write to {folder} ({err.strerror or err}); "
                          f"{hint}") from None


def _check_uri(uri: str, field: str, timeout_s: float) -> None:
    import threading

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            import pyarrow.fs

            fs, root = pyarrow.fs.FileSystem.from_uri(uri)
            fs.create_dir(root, recursive=True)
            marker = f"{root.rstrip('/')}/.raykd-probe-{uuid.uuid4().hex[:8]}"
            with fs.open_output_stream(marker):
                pass
            fs.delete_file(marker)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - reported as one line below
            outcome.append(err)

    thread = threading.Thread(target=probe, daemon=True, name="raykd-storage-probe")
    thread.start()
    thread.join(timeout_s)
    shown = redact(uri)
    if not outcome:
        raise ConfigError(f"{field}: no answer from {shown} within {timeout_s:g} s; check the "
                          f"URI and the credentials of the nodes")
    err = outcome[0]
    if err is not None:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{field}: cannot write to {shown} ({redact(reason)}); give a URI "
                          f"pyarrow understands (s3://, gs://, hdfs://, file://) that the "
                          f"nodes can write, or a shared folder")


def check_storage(cfg) -> None:
    """Every folder or URI this config writes to: one clear line for the first that fails."""
    check_writable(train_storage(cfg), "train.storage_path")
    check_writable(str(cache_dir(cfg)), "teacher.cache_dir", "give a local or shared folder "
                   "you can write")
    if cfg.tune is not None:
        check_writable(resolve(cfg.tune.storage_path, "tune"), "tune.storage_path",
                       "give a local or shared folder you can write")
