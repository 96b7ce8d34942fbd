"""Shadow evidence: one run per replica session, rewritten in place, pooled when read back. (The same
functions against a real `mlflow server`, written by a real replica: tests/serving/test_shadow.py.)"""

import dataclasses

import pytest

from liverseg.core.errors import TrackingError
from liverseg.tracking import tags
from liverseg.tracking.shadow import ShadowSummary, read_evidence, write_evidence

BASE = ShadowSummary(
    name="liver-unet-candidates",
    version="3",
    compared=10,
    dice_mean=0.9,
    dice_p05=0.8,
    volume_diff_ml_max=12.5,
    since="2026-12-01T10:00:00.000000Z",
    updated="2026-12-01T10:05:00.000000Z",
    not_shadowed=2,
    against=("1",),
    replicas=("serve-0:8080",),
)


def test_evidence_is_one_run_per_session_pooled_when_read(mlflow_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    assert read_evidence(client, "liver-unet-candidates", "3") is None  # no shadow experiment yet
    first = write_evidence(client, BASE)
    again = write_evidence(
        client, dataclasses.replace(BASE, compared=30, dice_mean=0.95, updated="2026-12-01T10:10:00Z")
    )
    assert again == first  # the session's run is rewritten, not duplicated
    other = dataclasses.replace(
        BASE,
        compared=10,
        dice_mean=0.7,
        dice_p05=0.5,
        volume_diff_ml_max=40.0,
        replicas=("serve-1:8080",),
        since="2026-12-01T09:00:00.000000Z",
    )
    write_evidence(client, other, final=True)
    write_evidence(
        client, dataclasses.replace(BASE, against=("2",), replicas=("serve-0:8080",), since="2026-12-02T00:00:00Z")
    )
    write_evidence(client, dataclasses.replace(BASE, name="another-model"))  # same version number, other model

    pooled = read_evidence(client, "liver-unet-candidates", "3", against="1")
    assert pooled.compared == 40 and pooled.dice_mean == pytest.approx((30 * 0.95 + 10 * 0.7) / 40)
    assert pooled.dice_p05 == 0.5 and pooled.volume_diff_ml_max == 40.0  # the worst replica's
    assert pooled.since == "2026-12-01T09:00:00.000000Z" and pooled.not_shadowed == 4
    assert pooled.replicas == ("serve-0:8080", "serve-1:8080") and pooled.against == ("1",)
    assert read_evidence(client, "liver-unet-candidates", "3").against == ("1", "2")
    assert read_evidence(client, "liver-unet-candidates", "4") is None

    exp = client.get_experiment_by_name(tags.SHADOW_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4 and {r.data.tags[tags.KIND] for r in runs} == {tags.SHADOW_KIND}
    finished = [r for r in runs if r.data.tags[tags.SHADOW_REPLICA] == "serve-1:8080"]
    assert [r.info.status for r in finished] == ["FINISHED"]
    history = client.get_metric_history(first, "shadow_dice_mean")
    assert [(m.step, m.value) for m in history] == [(10, 0.9), (30, 0.95)]  # step: requests compared
    with pytest.raises(TrackingError, match="a model version is a number"):
        read_evidence(client, "liver-unet-candidates", "3' or '1")
