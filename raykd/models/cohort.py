"""Cohorts: the members of an online-distillation scheme as one module, trained by the one loop.

A cohort's forward in training mode returns its members' logits stacked ``[M, B, C]`` (what the
online loss terms in :mod:`raykd.losses.online` read); in eval mode the logits of the model one
deploys (``[B, C]``: DML's and ONE's ensemble, BYOT's backbone). :meth:`Cohort.members` gives
every member's logits and the ensemble's, by name, for evaluation; :meth:`Cohort.exports` the
members that stand alone as ordinary models (a DML peer, a ONE branch with its trunk, BYOT's
backbone), as ``(ModelConfig, state_dict)``.

- :class:`Peers` (DML): K independent models.
- :class:`Branches` (ONE): a trunk up to ``split_at``, K copies of the rest, a gate over them.
  Built with forward hooks on module paths (``raykd.models.hooks``), so model code never changes.
- :class:`Exits` (BYOT): exits (bottleneck + classifier) hooked at module paths of a backbone.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from raykd.config import ConfigError, ModelConfig, RaykdConfig
from raykd.models import build_model
from raykd.models.hooks import FeatureHooks, probe_shapes, resolve_module


def ensemble_logits(logits: list[Tensor]) -> Tensor:
    """Log of the members' averaged probabilities: its argmax is the probability ensemble's."""
    return torch.stack([torch.log_softmax(z.float(), -1) for z in logits]).logsumexp(0) \
        - torch.log(torch.tensor(float(len(logits))))


class Cohort(nn.Module):
    def members(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def exports(self) -> dict[str, tuple[ModelConfig, dict[str, Tensor]]]:
        raise NotImplementedError


class Peers(Cohort):
    """DML's K peers; the ensemble averages their probabilities."""

    def __init__(self, peers: list[nn.Module], specs: list[ModelConfig]):
        super().__init__()
        self.peers = nn.ModuleList(peers)
        self.specs = specs

    def forward(self, x: Tensor) -> Tensor:
        logits = [p(x) for p in self.peers]
        return torch.stack(logits) if self.training else ensemble_logits(logits)

    def members(self, x: Tensor) -> dict[str, Tensor]:
        logits = [p(x) for p in self.peers]
        out = {f"peer{i}": z for i, z in enumerate(logits)}
        out["ensemble"] = ensemble_logits(logits)
        return out

    def exports(self):
        return {f"peer{i}": (spec, p.state_dict())
                for i, (p, spec) in enumerate(zip(self.peers, self.specs, strict=True))}


class _Replay(nn.Module):
    """Stands in for the trunk's last module inside a branch: returns the trunk's output."""

    def __init__(self):
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, *args, **kwargs) -> Tensor:
        return self.value


class Branches(Cohort):
    """ONE: one trunk (the base model up to and including ``split_at``), K branches (copies of
    the modules after it) and a gate (linear on the trunk's pooled output, softmax over the
    branches). A branch is the base model whose trunk modules are replaced: ``split_at`` by a
    module replaying the trunk's output, the modules that ran before it by identities — so the
    trunk runs once per batch. Exported, branch i is the base model with the trunk's weights and
    branch i's weights: an ordinary model of the base architecture."""

    def __init__(self, base: nn.Module, spec: ModelConfig, split_at: str, k: int,
                 example: Tensor):
        super().__init__()
        resolve_module(base, split_at, "online.split_at")
        self.spec, self.split_at = spec, split_at
        before, after = _run_order(base, split_at, example)
        self.trunk_names = before + [split_at]
        branches = []
        for _ in range(k):
            branch = copy.deepcopy(base)
            for name in _outermost(before):
                _set_module(branch, name, nn.Identity())
            _set_module(branch, split_at, _Replay())
            branches.append(branch)
        self.branches = nn.ModuleList(branches)
        # The trunk stops at split_at: what follows it is the branches' (every parameter of a
        # DDP-wrapped module must take part in the loss).
        for name in _outermost(after):
            _set_module(base, name, nn.Identity())
        self.trunk = base
        self._hooks = FeatureHooks(base, [split_at], "online.split_at").__enter__()
        with torch.no_grad():
            was = base.training
            base.eval()
            feats = self._trunk(example)
            base.train(was)
        self.gate = nn.Linear(feats.flatten(2).mean(-1).shape[-1] if feats.dim() > 2
                              else feats.shape[-1], k)

    def _trunk(self, x: Tensor) -> Tensor:
        # The base model's forward: the modules after split_at are identities in the trunk, so
        # this computes the trunk once and leaves model code untouched.
        self.trunk(x)
        return self._hooks.features[self.split_at]

    def _outputs(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        feats = self._trunk(x)
        logits = []
        for branch in self.branches:
            branch.get_submodule(self.split_at).value = feats
            logits.append(branch(x))
        pooled = feats.flatten(2).mean(-1) if feats.dim() > 2 else feats.flatten(1)
        gate = torch.softmax(self.gate(pooled), -1)  # [B, K]
        ensemble = (torch.stack(logits, -1) * gate[:, None, :]).sum(-1)
        return logits, ensemble

    def forward(self, x: Tensor) -> Tensor:
        logits, ensemble = self._outputs(x)
        return torch.stack([*logits, ensemble]) if self.training else ensemble

    def members(self, x: Tensor) -> dict[str, Tensor]:
        logits, ensemble = self._outputs(x)
        return {**{f"branch{i}": z for i, z in enumerate(logits)}, "ensemble": ensemble}

    def exports(self):
        trunk = {k: v for k, v in self.trunk.state_dict().items()
                 if any(k.startswith(n + ".") for n in self.trunk_names)}
        out = {}
        for i, branch in enumerate(self.branches):
            state = {k: v for k, v in branch.state_dict().items()
                     if not any(k.startswith(n + ".") for n in self.trunk_names)}
            out[f"branch{i}"] = (self.spec, {**state, **trunk})
        return out


class _Exit(nn.Module):
    """A BYOT exit: bottleneck to the deepest features' width, then a linear classifier."""

    def __init__(self, shape: torch.Size, width: int, num_classes: int):
        super().__init__()
        if len(shape) == 4:  # conv features: 1×1 conv, BN, ReLU, global average pool
            self.bottleneck = nn.Sequential(nn.Conv2d(shape[1], width, 1, bias=False),
                                            nn.BatchNorm2d(width), nn.ReLU(),
                                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.Size(
                shape[1:]).numel()), width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, feats: Tensor) -> Tensor:
        return self.classifier(self.bottleneck(feats))


class Exits(Cohort):
    """BYOT: exits at ``paths`` of ``backbone``, each to the width of the deepest features (the
    input of the backbone's last linear layer, what the hint matches). Training output: the
    exits' logits then the backbone's; eval: the backbone's — the model one deploys."""

    def __init__(self, backbone: nn.Module, spec: ModelConfig, paths: list[str],
                 example: Tensor):
        super().__init__()
        self.backbone, self.spec, self.paths = backbone, spec, list(paths)
        self.deep_path = last_linear_input(backbone)
        shapes = probe_shapes(backbone, [*self.paths, self.deep_path], example, "online.exits")
        width = int(shapes[self.deep_path][1:].numel())
        with torch.no_grad():
            classes = backbone.eval()(example).shape[-1]
        backbone.train()
        self.exits = nn.ModuleList(_Exit(shapes[p], width, classes) for p in self.paths)
        self._hooks = FeatureHooks(backbone, self.paths, "online.exits").__enter__()

    def _outputs(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        logits = self.backbone(x)
        return [e(self._hooks.features[p]) for e, p in zip(self.exits, self.paths,
                                                           strict=True)], logits

    def forward(self, x: Tensor) -> Tensor:
        exits, logits = self._outputs(x)
        return torch.stack([*exits, logits]) if self.training else logits

    def members(self, x: Tensor) -> dict[str, Tensor]:
        exits, logits = self._outputs(x)
        out = {f"exit{i}": z for i, z in enumerate(exits)}
        out["backbone"] = logits
        out["ensemble"] = ensemble_logits([*exits, logits])
        return out

    def exports(self):
        return {"backbone": (self.spec, self.backbone.state_dict())}

    def feature_paths(self) -> list[str]:
        """What the byot term hooks: each exit's bottleneck output, then the deepest features."""
        return [f"exits.{i}.bottleneck" for i in range(len(self.paths))] + [
            f"backbone.{self.deep_path}"]


def last_linear_input(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"online.exits: BYOT needs a last linear classifier in "
                          f"{type(model).__name__} (its input are the deepest features)")
    return f"{names[-1]}:input"


def _run_order(model: nn.Module, path: str, example: Tensor) -> tuple[list[str], list[str]]:
    """Names of the modules whose forward ended before ``path``'s began, and of those that began
    after it ended, in a probe forward (``path``'s ancestors are in neither)."""
    ended: list[str] = []
    started: dict[str, int] = {}
    handles = []

    def began(name: str):
        def hook(module, args) -> None:  # returning a value would replace the input
            started.setdefault(name, len(ended))
        return hook

    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(began(name)))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: ended.append(n)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    outer = [n for n in started if path.startswith(n + ".") or n == path]
    split_end = ended.index(path) + 1
    before = [n for n in ended[:started[path]] if n not in outer]
    after = [n for n, at in started.items() if at >= split_end and n not in outer]
    return before, after


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def build_cohort(cfg: RaykdConfig, info) -> Cohort:
    """The cohort ``cfg.online`` describes, around ``cfg.student`` (or ``online.models``)."""
    online = cfg.online
    example = torch.zeros(2, *info.input_shape)
    if online.scheme == "dml":
        specs = [online.models[min(i, len(online.models) - 1)] if online.models
                 else ModelConfig(name=cfg.student.name, args=cfg.student.args)
                 for i in range(online.peers)]
        peers = []
        for i, spec in enumerate(specs):
            torch.manual_seed(cfg.train.seed + i)  # peers start from different weights
            peers.append(build_model(spec, info, field=f"online.models.{i}" if online.models
                                     else "student"))
        return Peers(peers, specs)
    spec = ModelConfig(name=cfg.student.name, args=cfg.student.args)
    base = build_model(spec, info, field="student")
    if online.scheme == "one":
        if not online.split_at:
            raise ConfigError("online.split_at: ONE needs the last module of the shared trunk "
                              "(a module path of the student, e.g. layers.0 or layer2)")
        return Branches(base, spec, online.split_at, online.peers, example)
    return Exits(base, spec, list(online.exits), example)
