"""Born-again networks (Furlanello et al. 2018, arXiv 1805.04770).

Generation 0 is the teacher (trained now, or ``teacher.checkpoint``); generation i = 1…K learns
from generation i−1 through the teacher actor (a new cache per generation: its fingerprint is the
previous generation's weights), with the ``distill`` loss — ``configs/digits_born_again.yaml``
uses BAN's pure teacher matching. Each generation's model is ``born_again.students[i-1]`` (the
last repeats), by default the teacher's, as in the paper. At the end every generation is
evaluated on the test split, and so is BAN-E: the average of generations 1…K's probabilities
(0…K with ``born_again.ensemble_includes_teacher``).

config → lineage parent run → generation 0 → (teacher actor + cache → Ray Train fit) × K →
evaluation in the driver → plot, table and summary on the parent run.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from raykd import tracking
from raykd.config import BornAgainConfig, ConfigError, ModelConfig, RaykdConfig
from raykd.preflight import preflight
from raykd.schemes.chain import chain_run, given_model, taught_config, train_chain
from raykd.schemes.lineage import log_lineage, markdown, member_row
from raykd.schemes.offline import predict_checkpoints

SCHEME = "born-again"


def settings(cfg: RaykdConfig) -> BornAgainConfig:
    return cfg.born_again or BornAgainConfig()


def generation_model(cfg: RaykdConfig, i: int) -> ModelConfig:
    if i == 0:
        return given_model(cfg)
    students = settings(cfg).students
    return students[min(i, len(students)) - 1] if students else given_model(cfg)


def generation_config(cfg: RaykdConfig, i: int) -> RaykdConfig:
    """The config generation ``i`` (≥ 1) trains with: generation i−1's model teaches."""
    return taught_config(cfg, generation_model(cfg, i - 1), generation_model(cfg, i))


def preflight_born_again(cfg: RaykdConfig) -> None:
    """Every generation's models and loss terms, built on a probe batch, before Ray starts."""
    if cfg.teacher.ensemble:
        raise ConfigError("teacher.ensemble: born-again's generation 0 is one model; give "
                          "teacher.checkpoint (or neither, to train it)")
    preflight(cfg, roles=("teacher",))
    seen = set()
    for i in range(1, settings(cfg).generations + 1):
        pair = json.dumps([generation_model(cfg, j).model_dump() for j in (i - 1, i)],
                          sort_keys=True)
        if pair not in seen:
            seen.add(pair)
            preflight(generation_config(cfg, i))


def ban_probabilities(sources: list[str], cfg: RaykdConfig, uri: str, split: str = "test"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each member's logits [M, N, C], BAN-E's probabilities [N, C] — the members' softmax
    probabilities averaged —, labels [N])."""
    logits, labels = predict_checkpoints(sources, cfg, uri, split)
    return logits, torch.softmax(logits, -1).mean(0), labels


def run_born_again(cfg: RaykdConfig, *, resume: bool = False,
                   config_path: str | None = None) -> dict[str, Any]:
    ban = settings(cfg)
    with chain_run(cfg, SCHEME, resume, config_path) as (uri, lineage, finish):
        members = train_chain(cfg, ban.generations, lambda i: generation_config(cfg, i), uri,
                              lineage)
        # Every generation evaluated here, in the driver, with the same code; BAN-E likewise.
        logits, _, labels = ban_probabilities([m.source for m in members], cfg, uri)
        for m, member_logits in zip(members, logits, strict=True):
            m.accuracy = float((member_logits.argmax(-1) == labels).float().mean())
        chosen = members if ban.ensemble_includes_teacher else members[1:]
        first = 0 if ban.ensemble_includes_teacher else 1
        ensemble_probs = torch.softmax(logits[first:], -1).mean(0)
        ensemble = {"accuracy": float((ensemble_probs.argmax(-1) == labels).float().mean()),
                    "members": [m.index for m in chosen],
                    "includes_teacher": ban.ensemble_includes_teacher}
        best = max(members, key=lambda m: m.accuracy)
        table = markdown(SCHEME, members, [("BAN-E", ensemble["accuracy"],
                                            f"generations {chosen[0].index}–{chosen[-1].index}")])
        log_lineage(lineage, members, {"BAN-E": ensemble["accuracy"]}, table)
        for m in members:
            tracking.log_metrics(uri, lineage.parent, {"test_accuracy": m.accuracy}, step=m.index)
        tracking.log_metrics(uri, lineage.parent, {
            "ban_e_test_accuracy": ensemble["accuracy"], "best_generation": best.index,
            "generation_1_minus_0": members[1].accuracy - members[0].accuracy})
        summary: dict[str, Any] = {
            "generations": [member_row(SCHEME, m) for m in members], "ensemble": ensemble,
            "claims": {"generation_1_ge_0": members[1].accuracy >= members[0].accuracy,
                       "ban_e_ge_best": ensemble["accuracy"] >= best.accuracy},
            "markdown": table}
        return finish(summary)


def run_born_again_command(cfg: RaykdConfig, args) -> dict[str, Any]:
    """``raykd born-again``: ``cfg`` as the CLI loaded it (raykd.cli.load_args)."""
    preflight_born_again(cfg)
    summary = run_born_again(cfg, resume=args.resume, config_path=args.config)
    print("\n" + summary["markdown"])
    return summary
