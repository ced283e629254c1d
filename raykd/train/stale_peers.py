"""Codistillation's worker side (Anil et al. 2018, arXiv 1804.03235): stale copies of the other
groups, refreshed every ``staleness_steps`` steps through the exchange actor.

Every S steps rank 0 of a group publishes its weights (one ``ray.put`` of safetensors bytes; the
reference goes to the exchange inside a list) and gets back the other groups' latest references;
it fetches the versions it has not loaded yet and broadcasts them to its group's ranks, so every
rank of a group distils towards the same versions. Between refreshes no remote call is
made: each step runs the stale peers on the worker's own batch, locally.
"""

from __future__ import annotations

import torch
from torch import nn

START_TIMEOUT_S = 600.0  # how long a group waits for the others' workers before training alone


class StalePeers:
    def __init__(self, spec: dict, cfg, info, device, rank: int, world: int):
        from raykd.config import ModelConfig
        from raykd.models import build_model

        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        self.group, self.exchange = spec["group"], spec["exchange"]
        self.every, self.burn_in = int(spec["every"]), int(spec["burn_in"])
        self.model_cfg = ModelConfig(name=cfg.student.name, args=cfg.student.args)
        self.cfg, self.info = cfg, info
        self._build = build_model
        self.peers: dict[int, nn.Module] = {}  # group → its stale copy
        self.versions: dict[int, int] = {}  # group → the step its copy was published at
        # Start together: rank 0 waits for every group at the exchange, its ranks for rank 0.
        import ray

        arrived = ray.get(self.exchange.arrive.remote(self.group, START_TIMEOUT_S)) \
            if rank == 0 else None
        self._broadcast(arrived)

    def targets(self, x: torch.Tensor, step: int) -> torch.Tensor | None:
        """The peers' averaged prediction on ``x`` as log-probabilities (a constant), or None
        during burn-in and before any peer has published."""
        if step < self.burn_in or not self.peers:
            return None
        with torch.no_grad():
            probs = torch.stack([torch.softmax(p(x).float(), -1) for p in self.peers.values()])
        return probs.mean(0).clamp_min(1e-12).log()

    def after_step(self, model: nn.Module, step: int) -> None:
        """Every ``every`` steps: publish (rank 0) and refresh the stale copies (all ranks)."""
        if step % self.every:
            return
        import ray

        from raykd.train.checkpoint import checkpoint_bytes

        fresh = None
        if self.rank == 0:
            module = getattr(model, "module", model)
            ref = ray.put(checkpoint_bytes(module.state_dict(), {"name": self.model_cfg.name,
                                                                 "args": self.model_cfg.args},
                                           self.info))
            latest = ray.get(self.exchange.publish.remote(self.group, step, [ref]))
            fresh = {g: {"step": v["step"], "data": ray.get(v["refs"][0])}
                     for g, v in latest.items() if self.versions.get(g) != v["step"]}
        fresh = self._broadcast(fresh)  # the same versions on every rank of the group
        for g, version in fresh.items():
            self._load(g, version["data"])
            self.versions[g] = version["step"]
        if fresh and self.rank == 0:
            self.exchange.loaded.remote(self.group, {g: v["step"] for g, v in fresh.items()},
                                        step)

    def _broadcast(self, value):
        from raykd.train.collective import broadcast_object

        return broadcast_object(value, self.world)

    def _load(self, group: int, data: bytes) -> None:
        from safetensors.torch import load

        if group not in self.peers:
            self.peers[group] = self._build(self.model_cfg, self.info).to(self.device).eval()
        self.peers[group].load_state_dict(load(data))
