"""The config's sections for data, models, distillation, training and tracking (see
raykd.config, which validates them as one RaykdConfig and re-exports every name here).

Names are checked against the data, model and loss registries, which import nothing of the
config (their errors come from raykd.errors). They are imported inside the validators because
they import torch: ``import raykd.config``, the CLI's first import, stays without it (0.15 s,
against about 2 s with torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def known(name: str, names, what: str) -> str:
    """``name`` when a registry knows it, else the validation error listing what it knows."""
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(sorted(names))}")
    return name


class DataConfig(Section):
    name: str = "digits"
    root: str | None = None  # folder for mnist/fashion_mnist/cifar*/imagefolder
    download: bool = False  # torchvision datasets are never fetched unless asked
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # carved from train where no val split exists
    split_seed: int = 0  # fixed, seeded train/val/test split
    limit: int | None = Field(None, ge=1)  # keep only the first N items of each split (quick runs)
    num_samples: int = Field(512, ge=8)  # synthetic only
    image_size: int = Field(8, ge=4)  # synthetic size; imagefolder: required, the resize target
    channels: int = Field(1, ge=1)  # synthetic only
    num_classes: int = Field(10, ge=2)  # synthetic only
    # Semi-supervised data: how much of the train split keeps its labels — a count (int) or a
    # fraction in (0, 1), stratified and seeded by split_seed; the rest is an unlabelled pool
    # whose labels training never sees (teacher/baseline fits learn the labelled part alone).
    labelled: int | float | None = None
    # Where image/array datasets are prepared once as row stores (raykd/data/store.py); default
    # .raykd/data. On a cluster: storage every node reads (like data.root).
    store_dir: str | None = None
    # An unreadable image: stop the prepare naming the file (error) or leave it out (skip).
    on_bad_file: Literal["error", "skip"] = "error"
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

        return known(name, DATASETS, "dataset")

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
        if self.name == "imagefolder" and "image_size" not in self.model_fields_set:
            raise ValueError("image_size: imagefolder images are resized to data.image_size "
                             "pixels square, which has no default for them; set it, e.g. "
                             "--set data.image_size=64")
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
    shard_size: int = Field(65536, ge=1)  # rows per cache shard (resumed, checksummed as one)
    max_restarts: int = Field(3, ge=0)
    batch_size: int = Field(512, ge=1)  # teacher inference batch
    # The cache is built by a pool of teacher replicas (Ray Data map_batches over the train split,
    # raykd/teacher/pool.py), each reserving these resources. replica_cpus 0 (default) reserves
    # none, as the teacher actor: the build runs while the job's training workers, which hold
    # the CPUs, wait for it (a reserved CPU would wait for them forever on a full cluster); give
    # 1 for a pool with CPUs of its own. replica_gpus null follows teacher.use_gpu (the actor's
    # share). A pool larger than the cluster is refused before training.
    replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(0.0, ge=0)
    replica_gpus: float | None = Field(None, ge=0)
    # The teacher actor's GPU: null (auto) takes a fraction only when GPUs are left beside the
    # training workers; true asks for it (an error when none is left); false keeps it on CPU.
    use_gpu: bool | None = None
    # Live mode: how long the actor waits for the other workers' calls to run them in one
    # teacher pass (raykd/teacher/batching.py); null serves one call at a time.
    live_batch_window_ms: float | None = Field(5.0, ge=0.0)
    # Text: the teacher's own tokenizer (a folder holding tokenizer.json, or the file) when it
    # is not the student's (data.tokenizer). The cache build then tokenises each block's text
    # with it, and only token_uld can compare the two vocabularies (raykd/data/cross_tokens.py).
    tokenizer: str | None = None

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and _checks_files(info) and not Path(value).expanduser().exists():
            raise ValueError(f"{value!r} does not exist; give the folder holding the teacher's "
                             f"tokenizer.json (its save_pretrained folder) or the file")
        return value

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

        return known(name, LOSSES, "loss")


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
