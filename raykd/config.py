"""The one validated configuration of raykd.

YAML (read with ``yaml.safe_load`` only) + ``--set section.key=value`` overrides are merged into a
plain dict, then validated by pydantic. Every bad input becomes a :class:`ConfigError` whose message
is a single line naming the field and what is allowed; the CLI prints it and exits 2 before any Ray
cluster or MLflow run is started.

Files are checked to exist once, where the job is submitted: :func:`load_config` (the CLI's and
jobs' entry) validates with ``check_files``; the copies that workers and actors validate again
on other nodes do not look at their own disk (a file missing there is reported by the code that
reads it, naming the node: raykd.node_files).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

DEFAULT_CONFIG = "digits.yaml"  # embedded in the package (raykd/configs/)
URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


class ConfigError(ValueError):
    """Bad user input. ``str(err)`` is one line: ``field: what is wrong; what is allowed``."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    name: str = "digits"
    root: str | None = None  # folder for mnist/fashion_mnist/cifar*/imagefolder
    download: bool = False  # torchvision datasets are never fetched unless asked
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # carved from train where no val split exists
    split_seed: int = 0  # fixed, seeded train/val/test split
    limit: int | None = Field(None, ge=1)  # keep only the first N items of each split (quick runs)
    num_samples: int = Field(512, ge=8)  # synthetic only
    image_size: int = Field(8, ge=4)  # synthetic size; imagefolder resize target (set it!)
    channels: int = Field(1, ge=1)  # synthetic only
    num_classes: int = Field(10, ge=2)  # synthetic only
    # Semi-supervised data: how much of the train split keeps its labels — a count (int) or a
    # fraction in (0, 1), stratified and seeded by split_seed; the rest is an unlabelled pool
    # whose labels training never sees (teacher/baseline fits learn the labelled part alone).
    labelled: int | float | None = None
    # Text (data.name: text, raykd/data/text.py): the corpus file (.txt, .jsonl, .parquet), the
    # field holding the text in JSON lines / Parquet, the model's context (tokens per block), the
    # tokenizer (a folder or tokenizer.json, e.g. the teacher's save_pretrained folder; unset: a
    # byte-level BPE of vocab_size trained on the corpus, kept in tokenizer_dir, by default
    # beside the teacher cache).
    path: str | None = None
    text_field: str = "text"
    block_size: int = Field(128, ge=2)
    tokenizer: str | None = None
    vocab_size: int = Field(512, ge=260)  # 256 bytes + the end-of-text token + merges
    tokenizer_dir: str | None = None
    # Sequence-level KD (raykd seq-kd sets these for its student): the train split is the
    # teacher's generated sequences in this folder (raykd.data.sequences), with the corpus's own
    # train blocks after them when sequences_with_original; val and test stay the corpus's.
    sequences: str | None = None
    sequences_with_original: bool = False

    @field_validator("labelled")
    @classmethod
    def _labelled_amount(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, bool) or (isinstance(value, float) and not 0.0 < value < 1.0):
            raise ValueError(f"{value!r} is not a count or a fraction in (0, 1); give e.g. "
                             f"1000 (samples) or 0.1 (of the train split)")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value} labelled samples; give a count >= 1 or a fraction "
                             f"in (0, 1)")
        return value

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from raykd.data import DATASETS

        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
        return name

    @model_validator(mode="after")
    def _root_needed(self, info: ValidationInfo) -> DataConfig:
        from raykd.data import DATASETS

        if DATASETS[self.name].needs_root:
            if not self.root:
                raise ValueError(f"root: dataset {self.name!r} needs data.root (a folder); "
                                 f"set it with --set data.root=PATH")
            if (_checks_files(info) and not self.download
                    and not Path(self.root).expanduser().exists()):
                raise ValueError(f"root: folder {self.root!r} does not exist; point data.root at "
                                 f"the dataset or set data.download=true")
        if self.name == "text":
            if not self.path:
                raise ValueError("path: dataset 'text' needs a corpus file; set "
                                 "--set data.path=FILE (.txt, .jsonl or .parquet)")
            if _checks_files(info) and not Path(self.path).expanduser().is_file():
                raise ValueError(f"path: file {self.path!r} does not exist; give a .txt, "
                                 f".jsonl or .parquet corpus")
            if (_checks_files(info) and self.tokenizer
                    and not Path(self.tokenizer).expanduser().exists()):
                raise ValueError(f"tokenizer: {self.tokenizer!r} does not exist; give a folder "
                                 f"holding tokenizer.json (e.g. the teacher's save_pretrained "
                                 f"folder) or leave it unset to train a BPE on the corpus")
        return self


class ModelConfig(Section):
    name: str = "mlp"
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the model builder

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from raykd.models import is_known_model, model_names

        if not is_known_model(name):
            raise ValueError(f"unknown model {name!r}; allowed: {', '.join(model_names())} "
                             f"or torchvision:NAME")
        return name


def _checks_files(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("check_files"))


def _check_source(value: str, info: ValidationInfo) -> str:
    if value.startswith(URI_SCHEMES):
        return value
    path = Path(value).expanduser()
    if _checks_files(info) and path.is_dir():
        if not (path / "config.json").is_file():  # Hugging Face save_pretrained folders only
            raise ValueError(f"folder {value!r} holds no config.json; give a save_pretrained "
                             f"folder of a transformers model, a checkpoint file or an MLflow "
                             f"URI (runs:/RUN_ID/PATH, models:/NAME/VERSION)")
        return str(path.resolve())
    if _checks_files(info) and not path.is_file():
        kind = "file" if path.suffix else "folder"  # a save_pretrained folder has no suffix
        raise ValueError(f"{kind} {value!r} does not exist; give a checkpoint file, a "
                         f"save_pretrained folder (transformers) or an MLflow URI "
                         f"(runs:/RUN_ID/PATH, models:/NAME/VERSION)")
    return str(Path(value).expanduser().resolve())


class TransformConfig(Section):
    """One torchvision ``transforms.v2`` class by name with its keyword arguments."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> TransformConfig:
        from raykd.data.augment import build_transform

        build_transform([self])  # raises ValueError naming what is wrong
        return self


class TeacherConfig(ModelConfig):
    name: str = "mlp"
    checkpoint: str | None = None  # path or MLflow URI; none → the teacher is trained first
    ensemble: list[str] = Field(default_factory=list)  # several checkpoints, logits averaged
    epochs: int | None = Field(None, ge=1)  # teacher training; default train.epochs
    lr: float | None = Field(None, gt=0)
    jitter: int = Field(0, ge=0)  # ±pixels random translation while training the teacher
    augment: list[TransformConfig] = Field(default_factory=list)  # ditto, torchvision v2
    # cached: soft labels built once; replay: cached augmented views; live: the frozen teacher
    # runs on each batch (called `online` before issue #17; that name now errors, see below).
    mode: Literal["cached", "replay", "live"] = "cached"
    views: int = Field(4, ge=1)  # replay mode: cached augmented views per sample
    cache_dir: str | None = None  # a folder; default .raykd/cache (raykd/train/storage.py)
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    topk: int | None = Field(None, ge=1)  # keep only the top-k logits per sample
    shard_size: int = Field(65536, ge=1)  # rows per object-store shard
    max_restarts: int = Field(3, ge=0)
    batch_size: int = Field(512, ge=1)  # teacher inference batch
    # The teacher actor's GPU: null (auto) takes a fraction only when GPUs are left beside the
    # training workers; true asks for it (an error when none is left); false keeps it on CPU.
    use_gpu: bool | None = None
    # Live mode: how long the actor waits for the other workers' calls to run them in one
    # teacher pass (raykd/teacher/batching.py); null serves one call at a time.
    live_batch_window_ms: float | None = Field(5.0, ge=0.0)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_source(value, info)

    @field_validator("ensemble")
    @classmethod
    def _ensemble_sources(cls, values: list[str], info: ValidationInfo) -> list[str]:
        return [_check_source(v, info) for v in values]

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_renamed(cls, value: Any) -> Any:
        if value == "online":
            raise ValueError("'online' was renamed 'live' (a frozen teacher run on each batch); "
                             "set teacher.mode=live. Online distillation (peers trained "
                             "together) is the `raykd online` command")
        return value


class StudentConfig(ModelConfig):
    init_from_teacher: bool = False  # DistilBERT-style: copy every other teacher layer


class LossTermConfig(Section):
    name: str
    weight: float = Field(1.0, ge=0.0)
    student_layers: list[str] = Field(default_factory=list)  # module paths, hooked
    teacher_layers: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_term(cls, name: str) -> str:
        from raykd.losses import LOSSES

        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}")
        return name


class DistillConfig(Section):
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)  # weight of the soft-target term; CE gets 1 - alpha
    # None → Hinton KD: (1 - alpha)·CE + alpha·T²·KL. A list replaces it with Σ weight·term; a
    # `kd`/`dkd` term without its own temperature uses distill.temperature.
    losses: list[LossTermConfig] | None = None
    exclude_classes: list[int] = Field(default_factory=list)  # removed from the transfer set
    include_classes: list[int] | None = None  # transfer set keeps only these classes
    # With data.labelled: how the teacher labels the unlabelled pool — its distribution (soft)
    # or its argmax (hard) — and the confidence (max probability) a pool sample needs to be used.
    pseudo_labels: Literal["soft", "hard"] = "soft"
    confidence_threshold: float = Field(0.0, ge=0.0, lt=1.0)

    def terms(self) -> list[LossTermConfig]:
        if self.losses is not None:
            return list(self.losses)
        return [LossTermConfig(name="ce", weight=1.0 - self.alpha),
                LossTermConfig(name="kd", weight=self.alpha)]

    def layer_paths(self, side: Literal["student", "teacher"]) -> list[str]:
        """The module paths the terms hook on one side, each once, in order of first use."""
        paths: list[str] = []
        for term in self.terms():
            paths += [p for p in getattr(term, f"{side}_layers") if p not in paths]
        return paths


class TrainConfig(Section):
    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    # with use_gpu: a fraction < 1 lets workers share a GPU (gloo then, as NCCL takes one rank
    # per GPU), e.g. 2 workers on a 1-GPU machine with 0.5 (or 0.375, leaving the teacher 0.25)
    gpus_per_worker: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["constant", "cosine"] = "constant"
    jitter: int = Field(0, ge=0)  # ±pixels random translation of student inputs
    flip: bool = False  # random horizontal flips of student inputs (replay mode caches them)
    # torchvision transforms v2 applied to each student/baseline input (per sample, seeded)
    augment: list[TransformConfig] = Field(default_factory=list)
    # Ray Train restarts a failed worker group (a dead worker, a lost node) from its last
    # checkpoint this many times per fit; bad input is not retried (raykd.train.group).
    max_failures: int = Field(2, ge=0)
    # How the placement group spreads the workers over nodes (Ray's strategies); SPREAD puts
    # them on different nodes where it can, STRICT_SPREAD insists.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Checkpoints to Ray Train (for restarts): the last epoch always, plus every N epochs
    # (0: none) and whenever this many seconds have passed since the last one (null: never).
    checkpoint_every: int = Field(0, ge=0)
    checkpoint_seconds: float | None = Field(60.0, gt=0.0)
    # Which weights a fit returns (and is evaluated, logged and distilled from): the epoch best
    # on validation (accuracy, ties to the lower loss) or the last one.
    keep_checkpoint: Literal["best", "last"] = "best"
    # The student's forward under autocast (bf16, fp16 with a grad scaler); losses stay float32.
    # fp16 needs CUDA (use_gpu); bf16 also runs on CPU. See raykd/train/precision.py.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Where Ray Train keeps checkpoints (and the driver the fits' weights): a folder, a shared
    # filesystem path or a URI pyarrow understands (s3://, gs://, file://). On a cluster of
    # several nodes, storage every node reaches. Default .raykd/runs (raykd/train/storage.py).
    storage_path: str | None = None

    @model_validator(mode="after")
    def _gpu_settings(self) -> TrainConfig:
        if self.gpus_per_worker != 1.0 and not self.use_gpu:
            raise ValueError("gpus_per_worker: applies to GPU workers only; set "
                             "train.use_gpu=true or leave gpus_per_worker at 1")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision: fp16 autocast needs a GPU (train.use_gpu=true); on "
                             "CPU use train.precision=bf16 or fp32")
        return self


class TrackingConfig(Section):
    # default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (~/.raykd/mlflow.db inside a
    # Ray job package), made absolute in the driver
    uri: str | None = None
    experiment: str = "raykd"
    # register the distilled student as a version of this MLflow registered model (--register)
    register_as: str | None = None

    @field_validator("register_as")
    @classmethod
    def _model_name(cls, name: str | None) -> str | None:
        # models:/NAME/VERSION is how a registered model is addressed: no "/" or ":" in NAME
        if name is not None and (not name.strip() or any(c in name for c in "/:%")):
            raise ValueError(f"registered model name {name!r}: give a non-empty name without "
                             f"'/', ':' or '%', e.g. digits-student")
        return name


class TuneConfig(Section):
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)  # dotted key → distribution
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["fifo", "asha", "pbt"] = "fifo"
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)  # ASHA
    reduction_factor: float = Field(3.0, gt=1.0)
    # pbt: perturb every trial at once each interval (each waits for the rest there); else a
    # trial is compared when it reaches the interval, which needs the others' reports by then
    synch: bool = False
    storage_path: str | None = None  # a folder; default .raykd/tune (raykd/train/storage.py)
    name: str | None = None
    trial_cpus: float = Field(0.05, gt=0.0)  # the trial driver's share; workers bring their own


class BornAgainConfig(Section):
    """Born-again networks (Furlanello et al. 2018): generation i learns from generation i−1."""

    generations: int = Field(2, ge=1)  # K: generations trained after generation 0
    # the model of generation 1, 2, ... (the last repeats); empty: the teacher's, as in the paper
    students: list[ModelConfig] = Field(default_factory=list)
    ensemble_includes_teacher: bool = False  # BAN-E over generations 0..K instead of 1..K


class NoiseConfig(Section):
    """The student's noise in Noisy Student; the teacher is never noised when it labels."""

    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # sets the student model's `dropout`
    stochastic_depth: float | None = Field(None, ge=0.0, lt=1.0)  # models that have it
    augment: list[TransformConfig] = Field(default_factory=list)  # torchvision transforms v2


class NoisyStudentConfig(Section):
    """Noisy Student (Xie et al. 2020): round r's noised student learns labelled + pseudo-labelled
    data from round r−1's model and becomes the next teacher. Needs data.labelled."""

    rounds: int = Field(2, ge=1)
    # the student of round 1, 2, ... (the last repeats), each equal to or larger than its
    # teacher; empty: the student section
    students: list[ModelConfig] = Field(default_factory=list)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    # Round 0 trained under the same noise too (its model's dropout / stochastic depth and the
    # input augmentation); off: round 0 is the teacher section as it is. Labelling is clean.
    noise_teacher: bool = False


class OnlineConfig(Section):
    """Online distillation (``raykd online``): members trained together teach each other."""

    scheme: Literal["dml", "one", "byot", "codistill"] = "dml"
    # T of the members' soft targets. 1 for every scheme: DML and codistillation use none; ONE's
    # and BYOT's T = 3 (CIFAR) cost 2-4 points on digits' MLPs, measured (docs/online.md).
    temperature: float = Field(1.0, gt=0.0)
    peers: int = Field(2, ge=2)  # DML peers, ONE branches
    # DML: the model of peer 1, 2, ... (the last repeats); empty: K copies of the student
    models: list[ModelConfig] = Field(default_factory=list)
    split_at: str | None = None  # ONE: the last module of the shared trunk (a module path)
    exits: list[str] = Field(default_factory=list)  # BYOT: module paths that get an exit
    hint_weight: float = Field(0.03, ge=0.0)  # BYOT: the feature-hint term's weight
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # BYOT: the shallow exits' KD weight (1−α: CE)
    # codistillation: steps between weight exchanges (S) and before distilling (burn-in)
    staleness_steps: int = Field(10, ge=1)
    burn_in_steps: int = Field(0, ge=0)


class SequenceKDConfig(Section):
    """Sequence-level KD (Kim & Rush 2016): the teacher continues prompts from the train split,
    the student learns the generated sequences (``raykd seq-kd``, raykd.schemes.sequence_kd)."""

    prompts: int | None = Field(None, ge=1)  # how many train blocks give a prompt; None: all
    prompt_tokens: int = Field(8, ge=1)  # the first tokens of each chosen block
    new_tokens: int | None = Field(None, ge=1)  # None: fill the block (block_size + 1 − prompt)
    decoding: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0.0)  # sample only
    top_k: int | None = Field(None, ge=1)  # sample only; None: the whole vocabulary
    seed: int = 0  # sample only: the draws of the batch starting at row r use seed and r
    batch_size: int = Field(64, ge=1)  # prompts per generate call
    mix_original: bool = False  # the student also learns the corpus's own train blocks
    log_samples: int = Field(4, ge=0)  # decoded sequences logged as an MLflow artifact

    @model_validator(mode="after")
    def _sampling_only(self) -> SequenceKDConfig:
        if self.decoding == "greedy":
            if self.temperature != 1.0:
                raise ValueError("temperature: applies to decoding: sample only; remove it or "
                                 "set sequence_kd.decoding=sample")
            if self.top_k is not None:
                raise ValueError("top_k: applies to decoding: sample only; remove it or set "
                                 "sequence_kd.decoding=sample")
        return self

    def width(self, block_size: int) -> int:
        """Tokens per generated sequence: the prompt and its continuation."""
        return self.prompt_tokens + (self.new_tokens or block_size + 1 - self.prompt_tokens)


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
        for section in ("tune", "born_again", "noisy_student", "online", "sequence_kd"):
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
    from raykd.train.storage import resolve_config

    # files checked and storage paths made absolute here, in the driver
    return resolve_config(validate(raw, check_files=True))


def dump_yaml(cfg: RaykdConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
