"""Shadow evidence in MLflow: how a challenger version agreed with the champion on real requests, measured
by serving replicas (`serving.shadow`), and the summary read back (for `liverseg promote`).

Each replica session writes one run in the experiment `tags.SHADOW_EXPERIMENT`, tagged with the challenger
(`model_name`, `model_version`), the champion version it was compared with (`compared_with`), the replica
and since when; its metrics (`shadow_*`, step = requests compared) are rewritten periodically and at
shutdown. Writing needs EDIT on that experiment only (the `monitor` role); reading, READ.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from liverseg.core.clock import utc_now
from liverseg.core.errors import TrackingError
from liverseg.tracking import tags
from liverseg.tracking.runs import experiment_id, find_run

FIELDS = ("compared", "dice_mean", "dice_p05", "volume_diff_ml_max", "not_shadowed")  # logged as shadow_<field>
UPDATED = "shadow_updated"  # run tag: UTC time of the latest write


@dataclass(frozen=True)
class ShadowSummary:
    """A challenger version's agreement with the champion over `compared` requests.

    Per request: Dice of the two masks on the request's own grid (1.0 when both are empty) and the
    absolute difference of their volumes in ml. `dice_p05` is the 5th percentile of those Dice values
    (over several replicas: the lowest replica's, a bound rather than a pooled percentile);
    `volume_diff_ml_max` the largest difference. `since` / `updated`: UTC ISO times of the first
    comparison and of the latest write; `not_shadowed`: requests the champion answered that the shadow
    did not compare (its queue was full, it had no model, it failed); `against`: champion versions.
    """

    name: str
    version: str
    compared: int
    dice_mean: float
    dice_p05: float
    volume_diff_ml_max: float
    since: str
    updated: str = ""
    not_shadowed: int = 0
    against: tuple[str, ...] = ()
    replicas: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """One line for a terminal: requests compared since when, Dice mean and 5th percentile, volume."""
        return (
            f"shadow on live traffic: {self.compared} requests compared since {self.since}, Dice mean "
            f"{self.dice_mean:.4f}, 5th percentile {self.dice_p05:.4f}, largest volume difference "
            f"{self.volume_diff_ml_max:.1f} ml"
        )

    def decision_tags(self) -> dict[str, str]:
        """The figures as tags, recorded with a promotion decision (`tags.SHADOW_*`)."""
        return {
            tags.SHADOW_COMPARED: str(self.compared),
            tags.SHADOW_DICE_MEAN: f"{self.dice_mean:.6f}",
            tags.SHADOW_DICE_P05: f"{self.dice_p05:.6f}",
            tags.SHADOW_VOLUME_DIFF_MAX: f"{self.volume_diff_ml_max:.3f}",
            tags.SHADOW_EVIDENCE_SINCE: self.since,
        }


def _run_key(s: ShadowSummary) -> str:
    return f"shadow/{s.name}/{s.version}/{','.join(s.against)}/{','.join(s.replicas)}/{s.since}"


def write_evidence(client: Any, summary: ShadowSummary, final: bool = False) -> str:
    """Write one replica session's summary (one champion version in `against`, one replica) to its run,
    created on the first write; `final` ends the run (FINISHED). Returns the run id."""
    from mlflow.entities import Metric, RunTag

    exp = experiment_id(client, tags.SHADOW_EXPERIMENT)
    key = _run_key(summary)
    run = find_run(client, exp, key)
    if run is None:
        run_tags = {
            tags.RUN_KEY: key,
            tags.KIND: tags.SHADOW_KIND,
            tags.MODEL_NAME: summary.name,
            tags.MODEL_VERSION: summary.version,
            tags.COMPARED_WITH: ",".join(summary.against),
            tags.SHADOW_REPLICA: ",".join(summary.replicas),
            tags.SHADOW_SINCE: summary.since,
        }
        name = f"shadow {summary.name} v{summary.version} vs champion v{','.join(summary.against)}"
        run = client.create_run(exp, run_name=name, tags=run_tags)
    run_id = run.info.run_id
    now_ms = int(time.time() * 1000)
    values = {f: float(getattr(summary, f)) for f in FIELDS}
    metrics = [Metric(f"shadow_{f}", v, now_ms, summary.compared) for f, v in values.items() if math.isfinite(v)]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(UPDATED, summary.updated or utc_now())])
    if final:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def read_evidence(client: Any, name: str, version: str, against: str | None = None) -> ShadowSummary | None:
    """Every replica's evidence on challenger `name` v`version` (only against champion v`against` when
    given), pooled into one summary; None when there is none (or no shadow experiment)."""
    exp = client.get_experiment_by_name(tags.SHADOW_EXPERIMENT)
    if exp is None:
        return None
    runs, token = [], None
    if not str(version).isdigit():
        raise TrackingError(f"{name} v{version}: a model version is a number")
    query = f"tags.`{tags.KIND}` = '{tags.SHADOW_KIND}' and tags.`{tags.MODEL_VERSION}` = '{version}'"
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=query, max_results=1000, page_token=token)
        runs += [r for r in page if r.data.tags.get(tags.MODEL_NAME) == name]
        token = page.token
        if not token:
            break
    if against is not None:
        runs = [r for r in runs if r.data.tags.get(tags.COMPARED_WITH) == str(against)]
    parts = [_summary_of(r) for r in runs]
    parts = [p for p in parts if p.compared > 0]
    return _pool(name, str(version), parts) if parts else None


def _summary_of(run: Any) -> ShadowSummary:
    m, t = run.data.metrics, run.data.tags
    return ShadowSummary(
        name=t.get(tags.MODEL_NAME, ""),
        version=t.get(tags.MODEL_VERSION, ""),
        compared=int(m.get("shadow_compared", 0)),
        dice_mean=m.get("shadow_dice_mean", math.nan),
        dice_p05=m.get("shadow_dice_p05", math.nan),
        volume_diff_ml_max=m.get("shadow_volume_diff_ml_max", math.nan),
        since=t.get(tags.SHADOW_SINCE, ""),
        updated=t.get(UPDATED, ""),
        not_shadowed=int(m.get("shadow_not_shadowed", 0)),
        against=(t.get(tags.COMPARED_WITH, ""),),
        replicas=(t.get(tags.SHADOW_REPLICA, ""),),
    )


def _pool(name: str, version: str, parts: list[ShadowSummary]) -> ShadowSummary:
    n = sum(p.compared for p in parts)
    return ShadowSummary(
        name=name,
        version=version,
        compared=n,
        dice_mean=sum(p.dice_mean * p.compared for p in parts) / n,
        dice_p05=min(p.dice_p05 for p in parts),
        volume_diff_ml_max=max(p.volume_diff_ml_max for p in parts),
        since=min(p.since for p in parts),
        updated=max(p.updated for p in parts),
        not_shadowed=sum(p.not_shadowed for p in parts),
        against=tuple(sorted({a for p in parts for a in p.against}, key=lambda v: (len(v), v))),
        replicas=tuple(sorted({r for p in parts for r in p.replicas})),
    )
