"""Codistillation (Anil et al. 2018, arXiv 1804.03235): G groups, each its own data-parallel Ray
Train run with its own worker group, running at the same time. Every ``online.staleness_steps``
steps each group publishes its weights to the exchange actor and loads the other groups' latest
ones; after ``online.burn_in_steps`` it adds T²·KL(mean of the stale peers' predictions ‖ its
own) to its cross-entropy (the ``codistill`` term). The exchange logs every publication and
every load, so staleness can be checked."""

from __future__ import annotations

import time
from typing import Any

from raykd.config import ModelConfig, RaykdConfig


class Exchange:
    """Holds each group's latest weights (as an object it owns, so a version outlives the
    group that published it) and the log of what was published and loaded."""

    def __init__(self, groups: int):
        self.groups = groups
        self.arrived: set[int] = set()
        self.latest: dict[int, dict[str, Any]] = {}
        self.published: list[dict[str, Any]] = []
        self.loads: list[dict[str, Any]] = []

    def arrive(self, group: int, timeout_s: float) -> int:
        """Block until every group's workers are up (or ``timeout_s``): codistillation assumes
        the groups train at the same time, and a group that started alone would train its first
        steps with no peer at all. Returns how many groups had arrived."""
        self.arrived.add(group)
        deadline = time.monotonic() + timeout_s
        while len(self.arrived) < self.groups and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.arrived)

    def publish(self, group: int, step: int, refs: list) -> dict[int, dict[str, Any]]:
        import ray

        owned = ray.put(ray.get(refs[0]))
        self.latest[group] = {"step": step, "refs": [owned]}
        self.published.append({"group": group, "step": step, "time": time.time()})
        return {g: v for g, v in self.latest.items() if g != group}

    def loaded(self, group: int, versions: dict[int, int], step: int) -> None:
        for source, published in versions.items():
            self.loads.append({"group": group, "from": int(source), "published_step": published,
                               "at_step": step, "staleness": max(0, step - published),
                               "time": time.time()})

    def stats(self, every: int) -> dict[str, Any]:
        """``max_staleness_steps``: the oldest a peer copy can have been when used — its age
        when loaded plus the steps until the next refresh."""
        worst = max((entry["staleness"] for entry in self.loads), default=0)
        return {"published": len(self.published), "loaded": len(self.loads),
                "max_staleness_steps": worst + every - 1 if self.loads else 0,
                "log": {"published": self.published, "loads": self.loads}}


def loss_terms(cfg: RaykdConfig) -> list[dict]:
    return [{"name": "codistill", "params": {"temperature": cfg.online.temperature}}]


def alone(cfg: RaykdConfig) -> list[tuple[str, ModelConfig, int]]:
    """Each group's model trained by itself, from the same initial weights (seed + g)."""
    spec = ModelConfig(name=cfg.student.name, args=cfg.student.args)
    return [(f"group{g}", spec, cfg.train.seed + g) for g in range(cfg.online.peers)]
