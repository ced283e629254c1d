"""``raykd hinton-mnist --resume``: the job's parent run is a lineage (raykd.schemes.lineage)
keyed by its three configs and its section; each fit, once finished, carries its summary part
as a tag, so a resumed job reads the fits an interrupted one finished back by run name instead
of training them again."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from raykd import tracking
from raykd.schemes.hinton.config import JOB_SECTION, HintonPlan
from raykd.schemes.lineage import Lineage, finished_children, lineage_key

SCHEME = "hinton-mnist"
# On each fit's run once it has finished: its summary part (JSON), what --resume reads back.
FIT_TAG = "raykd.hinton.fit"


def plan_key(plan: HintonPlan) -> str:
    """The job's lineage key: its three configs and its section (what --resume must match)."""
    parts = {role: lineage_key(getattr(plan, role), SCHEME)
             for role in ("teacher", "baseline", "distill")}
    parts[JOB_SECTION] = plan.job.model_dump(mode="json")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def finished_fits(uri: str, experiment: str, scheme: str, parent: str) -> dict[str, Any]:
    """The fits of ``parent`` that finished, by run name, as the summary lists them
    (``read_finished`` of :func:`raykd.schemes.lineage.lineage_run`)."""
    found: dict[str, Any] = {}
    for run in finished_children(uri, experiment, parent):  # newest first
        tags = run.data.tags
        if FIT_TAG in tags and tags["mlflow.runName"] not in found:
            found[tags["mlflow.runName"]] = {**json.loads(tags[FIT_TAG]),
                                             "checkpoint": tags["raykd.checkpoint"],
                                             "resumed": True}
    return found


def finished_fit(lineage: Lineage, name: str, train) -> dict[str, Any]:
    """The fit ``name``: read back when an interrupted run of this job finished it, else
    ``train(name)`` now, its run tagged so that a later --resume keeps it."""
    if name in lineage.finished:
        print(f"raykd: {name}: kept from the interrupted run", flush=True)
        return lineage.finished[name]
    part = train(name)
    kept = {k: v for k, v in part.items() if k not in ("history", "checkpoint")}
    tracking.set_tags(lineage.uri, part["run_id"], {FIT_TAG: json.dumps(kept, default=str)})
    return part
