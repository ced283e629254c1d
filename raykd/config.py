"""The one validated configuration of raykd.

YAML (read with ``yaml.safe_load`` only) + ``--set section.key=value`` overrides are merged into a
plain dict, then validated by pydantic. Every bad input becomes a :class:`ConfigError` whose message
is a single line naming the field and what is allowed; the CLI prints it and exits 2 before any Ray
cluster or MLflow run is started.

Files are checked to exist once, where the job is submitted: :func:`load_config` (the CLI's and
jobs' entry) validates with ``check_files``; the copies that workers and actors validate again
on other nodes do not look at their own disk (a file missing there is reported by the code that
reads it, naming the node: raykd.node_files).

The sections themselves are in raykd/config_sections.py (data, models, distillation, training,
tracking) and raykd/config_schemes.py (tune and the schemes' own sections).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

# The sections live in two modules of their own (this file joins, validates and loads them);
# every name stays importable from here.
from raykd.config_schemes import (BornAgainConfig, HintonConfig, NoiseConfig,  # noqa: F401
                                  NoisyStudentConfig, OnlineConfig, SequenceKDConfig,
                                  TuneConfig)
from raykd.config_sections import (URI_SCHEMES, DataConfig, DistillConfig,  # noqa: F401
                                   LossTermConfig, ModelConfig, Section, StudentConfig,
                                   TeacherConfig, TrackingConfig, TrainConfig, TransformConfig)
from raykd.errors import ConfigError  # every `from raykd.config import ConfigError` keeps working

DEFAULT_CONFIG = "digits.yaml"  # embedded in the package (raykd/configs/)


class RaykdConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig | None = None
    born_again: BornAgainConfig | None = None
    noisy_student: NoisyStudentConfig | None = None
    online: OnlineConfig | None = None
    sequence_kd: SequenceKDConfig | None = None
    hinton: HintonConfig | None = None  # raykd hinton-mnist only

    @model_validator(mode="after")
    def _text_modes(self) -> RaykdConfig:
        if self.data.name == "text" and self.teacher.mode == "replay":
            raise ValueError("teacher.mode: replay caches augmented image views; text has none, "
                             "use teacher.mode=cached (per-token top-k cache) or live")
        seq, block = self.sequence_kd, self.data.block_size
        if seq is not None and self.data.name != "text":
            raise ValueError(f"sequence_kd: sequence-level KD generates text; it needs "
                             f"data.name: text, not {self.data.name!r}")
        if seq is not None and seq.prompt_tokens >= block:
            raise ValueError(f"sequence_kd.prompt_tokens: {seq.prompt_tokens} leaves no room "
                             f"to generate in a block of data.block_size={block}; give fewer "
                             f"than {block}")
        if seq is not None and seq.width(block) > block + 1:
            raise ValueError(f"sequence_kd.new_tokens: prompt_tokens + new_tokens = "
                             f"{seq.width(block)} tokens do not fit a training block of "
                             f"data.block_size={block} (at most {block + 1}); lower it or "
                             f"leave it unset to fill the block")
        return self

    @model_validator(mode="after")
    def _replay_renders_every_view(self) -> RaykdConfig:
        # Replay's cache renders view v of sample i from train.jitter/train.flip alone, seeded
        # per (i, v) (raykd.teacher.client.replay_inputs). train.augment applied after that view
        # would show the student an image the teacher never labelled. (Noisy Student's
        # noise.augment never meets replay: data.labelled needs teacher.mode=cached.)
        if self.teacher.mode == "replay" and self.train.augment:
            raise ValueError("train.augment: replay's cached views are rendered from "
                             "train.jitter/train.flip only, so these transforms would change "
                             "images after the teacher labelled them; remove train.augment or "
                             "set teacher.mode=cached (or live)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def applicable(self, tracking_uri: str | None = None) -> dict[str, Any]:
        """The resolved config without the fields that do nothing in this run (what MLflow
        logs as params): synthetic-data shape for other datasets, replay views outside replay
        mode, the teacher's training budget when a checkpoint is given, an absent tune."""
        raw = self.to_dict()
        data, teacher = raw["data"], raw["teacher"]
        if self.data.name != "synthetic":
            for key in ("num_samples", "channels", "num_classes"):
                data.pop(key)
        if self.data.name != "text":
            for key in ("path", "text_field", "block_size", "tokenizer", "vocab_size",
                        "tokenizer_dir", "sequences", "sequences_with_original"):
                data.pop(key)
            if self.data.name != "imagefolder":
                data.pop("image_size")
        if self.data.sequences is None:  # only sequence-level KD's student has them
            data.pop("sequences", None)
            data.pop("sequences_with_original", None)
        if self.teacher.mode != "replay":
            teacher.pop("views")
        if self.teacher.checkpoint or self.teacher.ensemble:
            for key in ("epochs", "lr", "jitter"):
                teacher.pop(key)
        if self.train.checkpoint_seconds is None:
            raw["train"].pop("checkpoint_seconds")
        for section in ("tune", "born_again", "noisy_student", "online", "sequence_kd",
                        "hinton"):
            if raw.get(section) is None:
                raw.pop(section, None)
        if self.data.labelled is None:
            raw["data"].pop("labelled")
            raw["distill"].pop("pseudo_labels")
            raw["distill"].pop("confidence_threshold")
        if tracking_uri is not None:
            raw["tracking"]["uri"] = tracking_uri
        return raw

    def with_overrides(self, overrides: dict[str, Any]) -> RaykdConfig:
        """A new validated config with dotted-key overrides applied (used by Tune trials)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return validate(raw)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check the spelling (see configs/ for the allowed keys)"
    # A section-level validator names its own sub-field as "field: ..."; fold it into the path.
    head, sep, rest = msg.partition(": ")
    if sep and head.isidentifier():
        loc, msg = f"{loc}.{head}" if loc else head, rest
    return f"{loc}: {msg}" if loc else msg


def validate(raw: dict[str, Any], check_files: bool = False) -> RaykdConfig:
    """``check_files``: also check that the files the config names exist here (the driver)."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping of sections")
    try:
        return RaykdConfig.model_validate(raw, context={"check_files": check_files})
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: no list item {part}; "
                                  f"use an index below {len(node)}")
            node = node[int(part)]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict | list):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section; "
                              f"cannot set {key}")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{key}: no list item {last}; use an index below {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected section.key=value, "
                              "e.g. --set train.epochs=5")
        out[key.strip()] = _parse_value(value)
    return out


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        text = resources.files("raykd.configs").joinpath(DEFAULT_CONFIG).read_text()
        source = f"<embedded {DEFAULT_CONFIG}>"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"--config: file {str(path)!r} does not exist; give a YAML config "
                              "path (examples in configs/) or omit --config for the digits "
                              "default")
        try:
            text, source = p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError:
            raise ConfigError(f"--config: {p} is not a text file (not UTF-8); give a YAML "
                              f"config file") from None
        except OSError as err:
            raise ConfigError(f"--config: cannot read {p} ({err.strerror}); check its "
                              f"permissions") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config: {source}{where} is not valid YAML; fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {source} must hold a mapping of sections "
                          "(data, teacher, ...)")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] = ()
                ) -> RaykdConfig:
    """Read YAML (or the embedded digits default), apply ``--set`` overrides, validate."""
    raw = copy.deepcopy(read_yaml(path))
    pairs = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
    for key, value in pairs.items():
        _set_dotted(raw, key, value)
    from raykd.train.storage import resolve_config  # it imports this module (ConfigError) back

    # files checked and storage paths made absolute here, in the driver
    return resolve_config(validate(raw, check_files=True))


def dump_yaml(cfg: RaykdConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
