"""The ``tune.space`` section: YAML distributions over dotted config keys → Ray Tune domains.

Syntax (one distribution per key)::

    tune:
      space:
        distill.temperature: {grid: [2, 4, 8]}          # every value, once (grid search)
        distill.alpha: {uniform: [0.1, 0.9]}
        train.lr: {loguniform: [1.0e-3, 1.0e-1]}
        distill.losses.1.weight: {choice: [0.5, 1.0]}
        train.batch_size: {randint: [32, 129]}           # high end exclusive
        distill.losses.1.params.beta: {quniform: [1, 8, 1]}

Every key is checked before anything starts: it must name an existing config value (or a new entry
of a free-form ``args``/``params`` mapping), and the values the distribution can produce must pass
the config's own validation (``RaykdConfig.with_overrides``). Problems are one-line
``ConfigError``s that start with ``tune.space.<key>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raykd.config import ConfigError, RaykdConfig

DISTRIBUTIONS = ("grid", "choice", "uniform", "quniform", "loguniform", "randint")
# Every trial shares one teacher and one soft-label cache, and runs on the same resources.
FIXED_PREFIXES = ("teacher.", "data.", "tracking.", "tune.")
FIXED_KEYS = ("train.num_workers", "train.cpus_per_worker", "train.use_gpu", "train.max_failures",
              "train.gpus_per_worker")
REPLAY_KEYS = ("train.jitter", "train.flip", "train.seed")  # baked into a replay cache's views
FREE_FORM = ("args", "params")  # mappings whose keys the config does not fix


@dataclass(frozen=True)
class Dim:
    """One searched key: ``kind`` is a name from DISTRIBUTIONS, ``values`` its YAML arguments."""

    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def probes(self) -> list[Any]:
        """Values that stand for everything this dimension can produce (validated up front)."""
        if self.discrete:
            return list(self.values)
        lo, hi = self.values[0], self.values[1]
        if self.kind == "randint":
            return [int(lo), int(hi) - 1]
        return [lo, hi]

    def domain(self, search: str):
        """The Ray Tune domain (``grid_search`` dict for grid search)."""
        from ray import tune

        if self.kind == "grid":
            # Optuna has no grid: its points become a categorical choice.
            return (tune.choice(list(self.values)) if search == "optuna"
                    else tune.grid_search(list(self.values)))
        if self.kind == "choice":
            return (tune.grid_search(list(self.values)) if search == "grid"
                    else tune.choice(list(self.values)))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "quniform":
            return tune.quniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(*self.values)

    def mutation(self):
        """What PBT may resample this key from."""
        return list(self.values) if self.discrete else self.domain("random")


def _number(key: str, kind: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"tune.space.{key}: {kind} needs numbers, got {value!r}; "
                          f"e.g. {{{kind}: [0.1, 0.9]}}")
    return value


def parse_dim(key: str, spec: Any) -> Dim:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"tune.space.{key}: give exactly one distribution, e.g. "
                          f"{{grid: [2, 4, 8]}}; allowed: {', '.join(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"tune.space.{key}: unknown distribution {kind!r}; allowed: "
                          f"{', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        example = "[2, 4, 8]" if kind in ("grid", "choice") else "[0.1, 0.9]"
        raise ConfigError(f"tune.space.{key}: {kind} needs a non-empty list, e.g. "
                          f"{{{kind}: {example}}}")
    if kind in ("grid", "choice"):
        return Dim(key, kind, tuple(args))
    want = 3 if kind == "quniform" else 2
    if len(args) != want:
        shape = "[low, high, step]" if kind == "quniform" else "[low, high]"
        raise ConfigError(f"tune.space.{key}: {kind} needs {shape}, got {args!r}")
    nums = [_number(key, kind, a) for a in args]
    lo, hi = nums[0], nums[1]
    if not lo < hi:
        raise ConfigError(f"tune.space.{key}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"tune.space.{key}: loguniform needs low > 0, got {args!r}")
    if kind == "randint" and not all(float(a).is_integer() for a in nums):
        raise ConfigError(f"tune.space.{key}: randint needs integers [low, high), got {args!r}")
    if kind == "randint":
        nums = [int(a) for a in nums]
    if kind == "quniform" and nums[2] <= 0:
        raise ConfigError(f"tune.space.{key}: quniform needs a step > 0, got {args!r}")
    return Dim(key, kind, tuple(nums))


def _key_exists(raw: Any, key: str) -> bool:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return False
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                # New keys are fine only inside free-form mappings (model args, loss params).
                return i > 0 and parts[i - 1] in FREE_FORM and i == len(parts) - 1
            node = node[part]
        else:
            return False
    return True


def _check_key(cfg: RaykdConfig, key: str) -> None:
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"tune.space.{key}: not a dotted config key; use e.g. "
                          f"distill.temperature")
    if key.startswith(FIXED_PREFIXES) or key in FIXED_KEYS:
        raise ConfigError(f"tune.space.{key}: cannot be searched — every trial shares one "
                          f"teacher, one cache and the same resources; search student.*, "
                          f"distill.* or train.* values")
    if cfg.teacher.mode == "replay" and key in REPLAY_KEYS:
        raise ConfigError(f"tune.space.{key}: is baked into the replay cache's augmented views; "
                          f"fix it or use teacher.mode=cached")
    if not _key_exists(cfg.to_dict(), key):
        hint = ("distill.losses is not set, so it has no items; list the loss terms in the config"
                if key.startswith("distill.losses.") and cfg.distill.losses is None
                else "keys look like distill.temperature, distill.alpha, train.lr, "
                     "distill.losses.0.weight")
        raise ConfigError(f"tune.space.{key}: no such config value; {hint}")


def parse_space(cfg: RaykdConfig) -> list[Dim]:
    """Parse and validate ``cfg.tune.space`` against ``cfg`` (see the module docstring)."""
    if cfg.tune is None or not cfg.tune.space:
        raise ConfigError("tune.space: empty; give at least one key, e.g. "
                          "tune: {space: {distill.temperature: {grid: [2, 4, 8]}}}")
    dims: list[Dim] = []
    for key, spec in cfg.tune.space.items():
        _check_key(cfg, key)
        dim = parse_dim(key, spec)
        for value in dim.probes():
            try:
                cfg.with_overrides({key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.space.{key}: value {value!r} is not allowed "
                                  f"({err})") from None
        dims.append(dim)
    search, scheduler = cfg.tune.search, cfg.tune.scheduler
    if search == "grid":
        bad = [d.key for d in dims if not d.discrete]
        if bad:
            raise ConfigError(f"tune.space.{bad[0]}: grid search needs grid or choice values; "
                              f"use tune.search=random or optuna for ranges")
    if scheduler == "pbt":
        if search == "optuna":
            raise ConfigError("tune.scheduler: pbt picks its own configs; use tune.search=random "
                              "(or grid) with it")
        if any(d.key == "train.lr" or d.key.startswith("train.optimizer") for d in dims):
            raise ConfigError("tune.space.train.lr: pbt continues from a checkpoint whose "
                              "optimizer state fixes the learning rate; search it with asha/fifo")
    return dims


def corner(dims: list[Dim]) -> dict[str, Any]:
    """One concrete point of the space (each dimension's first probe), for a preflight check."""
    return {d.key: d.probes()[0] for d in dims}


def param_space(dims: list[Dim], search: str) -> dict[str, Any]:
    return {d.key: d.domain(search) for d in dims}
