"""The lineage of a generational scheme (born-again, Noisy Student) in MLflow.

One parent run per scheme, tagged ``raykd.scheme`` and ``raykd.lineage_key`` (a hash of the
config, generation count left out). One child run per generation (``raykd.generation``) or round
(``raykd.round``), tagged with ``raykd.teacher_run_id`` (the run of the model that taught it),
``raykd.cache_key`` (the teacher cache it read) and, once finished, ``raykd.checkpoint`` (where its
weights are). ``--resume`` finds the newest parent with the same key and continues after its
last finished member: finished members are read back from these tags, never retrained.

Offline distillation (``raykd distill --resume``), ``raykd train-teacher --resume`` and
``raykd seq-kd --resume`` use the same parent run and key; their members are their fits by role
(teacher, student, baseline: ``raykd.role``), see ``finished_roles``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raykd import tracking
from raykd.config import RaykdConfig

MEMBER_TAG = {"born-again": "raykd.generation", "noisy-student": "raykd.round"}
# Every other scheme (offline, train-teacher, sequence-kd, online-*, hinton-mnist) counts fits.
MEMBER_WORD = {"born-again": "generation", "noisy-student": "round"}


def member_word(scheme: str) -> str:
    """What one member of ``scheme``'s lineage is called in messages and tables."""
    return MEMBER_WORD.get(scheme, "fit")


# What does not change the models a lineage trains: how long it runs, where it logs, restarts.
_KEY_IGNORES = {("born_again", "generations"), ("noisy_student", "rounds"),
                ("train", "max_failures"), ("train", "checkpoint_every"),
                ("train", "checkpoint_seconds"), ("tracking", "uri")}


@dataclass
class Member:
    """One generation / round: its run, its teacher's run, its weights and its accuracy."""

    index: int
    run_id: str
    teacher_run_id: str | None
    source: str  # weights as the next teacher reads them: runs:/ URI or the given checkpoint
    accuracy: float | None = None
    params: int | None = None
    cache_key: str | None = None
    resumed: bool = False  # finished in an earlier, interrupted run of the same lineage
    fit: dict[str, Any] = field(default_factory=dict)  # timings, transfer set, best epoch...


def lineage_key(cfg: RaykdConfig, scheme: str) -> str:
    raw = cfg.to_dict()
    for section, key in _KEY_IGNORES:
        if isinstance(raw.get(section), dict):
            raw[section].pop(key, None)
    blob = json.dumps({"scheme": scheme, "config": raw}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def member_tags(scheme: str, index: int, teacher_run_id: str | None,
                cache_key: str | None) -> dict[str, str]:
    return {MEMBER_TAG[scheme]: str(index), "raykd.teacher_run_id": teacher_run_id or "",
            "raykd.cache_key": cache_key or ""}


@dataclass
class Lineage:
    uri: str
    scheme: str
    parent: str  # the parent run id
    finished: dict[Any, Member]  # members read back from an interrupted run (--resume)

    @property
    def word(self) -> str:
        return member_word(self.scheme)

    def record(self, member: Member) -> None:
        """Mark ``member`` finished: where its weights are, so a resume can pick it up."""
        tracking.set_tags(self.uri, member.run_id, {"raykd.checkpoint": member.source})


def finished_children(uri: str, experiment: str, parent: str) -> list:
    """The FINISHED child runs of ``parent`` that recorded their weights (``raykd.checkpoint``),
    newest first; children an interrupted driver left RUNNING are marked KILLED on the way, so
    MLflow never shows a half-finished run as running or finished."""
    children = tracking.search_runs(uri, experiment, f"tags.`mlflow.parentRunId` = '{parent}'",
                                    order_by=["attributes.start_time DESC"], max_results=1000)
    done = []
    for run in children:
        if run.info.status == "RUNNING":  # its driver died mid-fit
            tracking.end_run(uri, run.info.run_id, "KILLED")
        elif run.info.status == "FINISHED" and run.data.tags.get("raykd.checkpoint"):
            done.append(run)
    return done


def _member(run, index: int) -> Member:
    tags, metrics = run.data.tags, run.data.metrics
    return Member(index=index, run_id=run.info.run_id,
                  teacher_run_id=tags.get("raykd.teacher_run_id") or None,
                  source=tags["raykd.checkpoint"], accuracy=metrics.get("test_accuracy"),
                  params=int(metrics["params"]) if "params" in metrics else None,
                  cache_key=tags.get("raykd.cache_key") or None, resumed=True)


def finished_roles(uri: str, experiment: str, scheme: str, parent: str) -> dict[str, Member]:
    """Offline distillation's finished fits under ``parent`` by role (teacher, student,
    baseline); the others are trained again."""
    found: dict[str, Member] = {}
    for run in finished_children(uri, experiment, parent):
        role = run.data.tags.get("raykd.role")
        if role:
            found.setdefault(role, _member(run, 0))
    return found


def finished_by_name(uri: str, experiment: str, scheme: str, parent: str) -> dict[str, Member]:
    """The finished fits under ``parent`` by run name (online's baselines: ``student-alone``)."""
    found: dict[str, Member] = {}
    for run in finished_children(uri, experiment, parent):
        found.setdefault(run.info.run_name, _member(run, 0))
    return found


def _finished_members(uri: str, experiment: str, scheme: str, parent: str) -> dict[int, Member]:
    """The longest run of finished members 0, 1, 2... under ``parent``; the children of the
    interrupted run that never finished are marked KILLED."""
    tag = MEMBER_TAG[scheme]
    found: dict[int, Member] = {}
    for run in finished_children(uri, experiment, parent):
        if run.data.tags.get(tag, "").isdigit():
            found.setdefault(int(run.data.tags[tag]), _member(run, int(run.data.tags[tag])))
    out: dict[int, Member] = {}
    while len(out) in found:  # a gap means the chain broke there: continue from it
        out[len(out)] = found[len(out)]
    return out


@contextmanager
def lineage_run(uri: str, cfg: RaykdConfig, scheme: str, resume: bool, name: str,
                read_finished=None, key: str | None = None):
    """The scheme's parent run (new, or with ``resume`` the newest one with this config's key,
    re-opened) as a :class:`Lineage`; FINISHED at the end, FAILED / KILLED on an exception.
    ``read_finished(uri, experiment, scheme, parent)``: its finished members (default: the
    generations / rounds in order). ``key``: the job's own, when ``cfg`` is not all it runs."""
    key = key or lineage_key(cfg, scheme)
    experiment = cfg.tracking.experiment
    parent, finished = None, {}
    if resume:
        runs = tracking.search_runs(
            uri, experiment, f"tags.`raykd.scheme` = '{scheme}' and "
                             f"tags.`raykd.lineage_key` = '{key}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            parent = runs[0].info.run_id
            tracking.client(uri).update_run(parent, status="RUNNING")
            finished = (read_finished or _finished_members)(uri, experiment, scheme, parent)
            print(f"raykd: resuming {scheme} run {parent}: {len(finished)} finished "
                  f"{member_word(scheme)}(s) kept", flush=True)
        else:
            print(f"raykd: --resume: no earlier {scheme} run with this config in experiment "
                  f"{experiment!r}; starting from {member_word(scheme)} 0",
                  flush=True)
    if parent is None:
        parent = tracking.start_run(uri, experiment, name, None,
                                    {"raykd.scheme": scheme, "raykd.lineage_key": key})
    try:
        yield Lineage(uri, scheme, parent, finished)
    except KeyboardInterrupt:
        tracking.end_run(uri, parent, "KILLED")
        raise
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")
        raise
    tracking.end_run(uri, parent)


def member_row(scheme: str, m: Member) -> dict[str, Any]:
    """A member as the summary lists it."""
    word = member_word(scheme)
    row = {word: m.index, "accuracy": m.accuracy, "params": m.params, "run_id": m.run_id,
           "teacher_run_id": m.teacher_run_id, "checkpoint": m.source, "cache_key": m.cache_key,
           "resumed": m.resumed}
    return {**row, **{k: v for k, v in m.fit.items() if k not in row}}


def markdown(scheme: str, members: list[Member], extra_rows: list[tuple[str, float, str]] = ()
             ) -> str:
    word = member_word(scheme)
    lines = [f"| {word} | run | taught by | test accuracy | params | cache key |",
             "|---|---|---|---|---|---|"]
    for m in members:
        acc = "" if m.accuracy is None else f"{m.accuracy * 100:.2f}%"
        lines.append(f"| {m.index}{' (resumed)' if m.resumed else ''} | {m.run_id[:8]} | "
                     f"{(m.teacher_run_id or '—')[:8]} | {acc} | {m.params or 0:,} | "
                     f"{(m.cache_key or '—')[:12]} |")
    for label, acc, note in extra_rows:
        lines.append(f"| {label} | | {note} | {acc * 100:.2f}% | | |")
    return "\n".join(lines) + "\n"


def log_lineage(lineage: Lineage, members: list[Member], lines: dict[str, float],
                table: str) -> None:
    """The parent's plot (test accuracy by generation, ``lines`` as horizontal references, e.g.
    BAN-E) and markdown table, plus the members as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    word = member_word(lineage.scheme)
    with tempfile.TemporaryDirectory() as tmp:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [m.index for m in members if m.accuracy is not None]
        ys = [m.accuracy * 100 for m in members if m.accuracy is not None]
        ax.plot(xs, ys, "o-", label=f"each {word}")
        for (label, value), style in zip(lines.items(), ("--", ":", "-."), strict=False):
            ax.axhline(value * 100, linestyle=style, color="gray", label=label)
        ax.set_xlabel(word)
        ax.set_ylabel("test accuracy (%)")
        ax.set_xticks(xs)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(tmp) / "lineage.png", dpi=120)
        plt.close(fig)
        tracking.log_artifact(lineage.uri, lineage.parent, Path(tmp) / "lineage.png")
    tracking.log_text(lineage.uri, lineage.parent, table, "lineage.md")
    tracking.log_dict(lineage.uri, lineage.parent, [asdict(m) for m in members], "lineage.json")


def read_chains(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every born-again / Noisy Student parent run of ``experiment``, newest first, with its
    members in order (what ``raykd report`` shows): ``{scheme, run_id, status, members: [...]}``.
    """
    chains = []
    parents = tracking.search_runs(uri, experiment, "tags.`raykd.lineage_key` != ''",
                                   order_by=["attributes.start_time DESC"], max_results=100)
    for parent in parents:
        scheme = parent.data.tags.get("raykd.scheme")
        if scheme not in MEMBER_TAG:
            continue
        tag = MEMBER_TAG[scheme]
        children = tracking.search_runs(
            uri, experiment, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            max_results=1000)
        members = sorted(({"index": int(c.data.tags[tag]), "run_id": c.info.run_id,
                           "status": c.info.status,
                           "teacher_run_id": c.data.tags.get("raykd.teacher_run_id") or None,
                           "accuracy": c.data.metrics.get("test_accuracy"),
                           "cache_key": c.data.tags.get("raykd.cache_key") or None}
                          for c in children if c.data.tags.get(tag, "").isdigit()),
                         key=lambda m: (m["index"], m["status"] != "FINISHED"))
        chains.append({"scheme": scheme, "run_id": parent.info.run_id,
                       "status": parent.info.status, "members": members,
                       "ensemble": parent.data.metrics.get("ban_e_test_accuracy")})
    return chains


def chain_markdown(chains: list[dict[str, Any]]) -> list[str]:
    """Lines of the report's lineage section: one chain per parent run, teacher → student."""
    lines: list[str] = []
    for chain in chains:
        word = member_word(chain["scheme"])
        lines += ["", f"### {chain['scheme']} `{chain['run_id'][:8]}` ({chain['status']})", "",
                  f"| {word} | run | taught by | status | test accuracy | cache key |",
                  "|---:|---|---|---|---:|---|"]
        for m in chain["members"]:
            acc = "" if m["accuracy"] is None else f"{m['accuracy'] * 100:.2f}%"
            lines.append(f"| {m['index']} | `{m['run_id'][:8]}` | "
                         f"`{(m['teacher_run_id'] or '—')[:8]}` | {m['status']} | {acc} | "
                         f"{(m['cache_key'] or '—')[:12]} |")
        if chain["ensemble"] is not None:
            lines.append(f"| BAN-E | | | | {chain['ensemble'] * 100:.2f}% | |")
    return ["", "## Lineage (generations and rounds)", *lines] if lines else []
