"""The config's sections for the schemes beyond offline distillation: Tune, born-again,
Noisy Student, online ensembles, sequence-level KD and the Hinton MNIST job (re-exported by
raykd.config).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raykd.config_sections import ModelConfig, Section, TransformConfig


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


HINTON_EXPERIMENTS = ("table", "omitted", "two_class")


class HintonConfig(Section):
    """``raykd hinton-mnist`` (Hinton et al. 2015 §3, raykd.schemes.hinton): the job's section
    of its main config, which describes the distilled student; the teacher's and the baseline's
    configs are the files named here (relative to the main config's folder)."""

    teacher_config: str = "mnist_hinton_teacher.yaml"
    baseline_config: str = "mnist_hinton_student.yaml"
    experiments: list[Literal["table", "omitted", "two_class"]] = Field(
        default_factory=lambda: list(HINTON_EXPERIMENTS))
    omit_class: int = Field(3, ge=0)  # removed from the transfer set in "omitted"
    two_classes: list[int] = Field(default_factory=lambda: [7, 8])  # the whole "two_class" set
    shift_low: float = -15.0  # bias-shift grid, scanned on the validation split
    shift_high: float = 15.0
    shift_step: float = Field(0.1, gt=0.0)
    reuse_teacher: bool = True  # reuse a finished teacher run with the same teacher key
    # the table's baseline and distilled students, once per seed (train.seed); None = once, with
    # the configs' own train.seed. The omitted and two-class students use the configs' seed.
    seeds: list[int] | None = None

    @field_validator("experiments")
    @classmethod
    def _some_experiment(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"name at least one experiment; allowed: "
                             f"{', '.join(HINTON_EXPERIMENTS)}")
        return list(dict.fromkeys(value))

    @field_validator("two_classes")
    @classmethod
    def _two_classes(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("give one or more distinct class numbers, e.g. [7, 8]")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value) or min(value) < 0):
            raise ValueError("give distinct non-negative seeds, e.g. [0, 1, 2] (or null for one "
                             "run with train.seed)")
        return value

    @model_validator(mode="after")
    def _grid(self) -> HintonConfig:
        if self.shift_high < self.shift_low:
            raise ValueError(f"shift_high: {self.shift_high} is below shift_low "
                             f"{self.shift_low}; give low <= high")
        return self
