"""A shadow challenger on a real replica, with a real `mlflow server`: it cannot load at first (the
champion serves on, /model and /metrics say why), then follows its alias, segments every answered
request unseen, and its agreement reaches the registry (read back with `read_evidence`)."""

import concurrent.futures as cf
import gzip
import json
import time

import httpx
import nibabel as nib
import numpy as np
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from liverseg.tracking.shadow import read_evidence
from support.models import constant_state, log_model_run
from support.prom import delta, scrape, value
from support.servers import WEBHOOK_HMAC, serve_champion, start_mlflow_server, stop

SHADOW = "models:/liver-unet-candidates@shadowed"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    root = tmp_path_factory.mktemp("shadow")
    server = start_mlflow_server(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        mp.chdir(root)
        yield root, server.uri
    server.stop()


@pytest.fixture(scope="module")
def shadowed(tracking, store_path):
    """liver-unet@champion v1 (no liver) served, shadowed by liver-unet-candidates@shadowed (no such alias
    yet); evidence every second, a shadow queue of one request."""
    sets = (
        "serve.poll_s=1",
        "serve.retry_max_s=2",
        "serve.evidence_s=1",
        "serve.shadow_queue=1",
        f"serve.shadow={SHADOW}",
    )
    yield from serve_champion(store_path, tracking[0], 1, 30, *sets, env={"LIVERSEG_WEBHOOK_SECRET": WEBHOOK_HMAC})


def _ml(real_ct) -> float:
    """The real CT's whole volume in ml: what an every-voxel mask differs from an empty one by."""
    img = nib.load(str(real_ct / "volume-0.nii.gz"))
    return float(np.prod(img.shape) * np.prod(img.header.get_zooms()[:3]) / 1000)


def _logged(replica, request_id: str) -> dict:
    """The access-log line of a request (written once the answer is sent: wait for it)."""
    for _ in range(50):
        lines = [json.loads(x) for x in replica.log_lines() if x.startswith("{")]
        found = [x for x in lines if x["request_id"] == request_id]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no access-log line for {request_id}")


def _wait(what, timeout_s: float = 90):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        got = what()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout_s} s: {what.__doc__}")


def test_agreement_of_two_masks_and_its_summary():
    from liverseg.serving.shadow import KEPT_DICE, Agreement, agreement

    a, b = np.zeros((4, 8, 8), np.uint8), np.zeros((4, 8, 8), np.uint8)
    assert agreement(a, b, 0.5) == (1.0, 0.0)  # both empty: they agree
    a[0, :4] = 1  # 32 voxels
    b[0, :2] = 1  # 16 of them
    assert agreement(a, b, 0.5) == (pytest.approx(2 * 16 / 48), 8.0)
    series = Agreement("liver-unet-candidates", "7", "3", "serve-0:8080")
    for dice in np.linspace(0, 1, 101):
        series.add(float(dice), float(dice) * 10)
    s = series.summary()
    assert (s.compared, s.dice_mean, s.dice_p05, s.volume_diff_ml_max) == (
        101,
        pytest.approx(0.5),
        pytest.approx(0.05),
        10.0,
    )
    assert s.against == ("3",) and s.replicas == ("serve-0:8080",) and s.since <= s.updated
    for _ in range(KEPT_DICE):  # past the kept sample: the mean stays exact, the sample stays bounded
        series.add(1.0, 0.0)
    assert len(series.kept) == KEPT_DICE and series.summary().dice_mean == pytest.approx(
        (50.5 + KEPT_DICE) / (101 + KEPT_DICE)
    )


@pytest.mark.slow
def test_a_shadow_that_cannot_load_leaves_the_champion_serving(shadowed, real_ct):
    base = shadowed.base
    assert httpx.get(base + "/health").json() == {"status": "ok", "version": "1"}
    shadow = httpx.get(base + "/model").json()["shadow"]
    assert shadow["uri"] == SHADOW and shadow["status"] == "no model" and "version" not in shadow
    assert f"cannot follow {SHADOW}" in shadow["reason"], shadow
    ct = (real_ct / "volume-0.nii.gz").read_bytes()
    r = httpx.post(base + "/segment", content=ct, headers={"X-Request-Id": "unshadowed"}, timeout=120)
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    assert _logged(shadowed, "unshadowed")["shadow"] == "no_model"
    samples = scrape(base)
    assert value(samples, "liverseg_model_loads_total", role="shadow", outcome="failed") >= 1
    assert value(samples, "liverseg_follow_degraded", role="shadow") == 1
    assert value(samples, "liverseg_follow_degraded", role="champion") == 0
    assert value(samples, "liverseg_shadow_requests_total", outcome="no_model") == 1
    assert not [k for k in samples if k[0] == "liverseg_shadow_model_info"]


@pytest.mark.slow
def test_the_shadow_follows_its_alias_and_never_answers(shadowed, real_ct, store_path):
    from mlflow.tracking import MlflowClient

    from liverseg.registry.register import register

    base, client = shadowed.base, MlflowClient()
    run, _ = log_model_run(constant_state(liver=True), store_path=store_path)
    v2 = register(run_id=run).version  # every voxel liver: the champion's empty masks differ entirely
    client.set_registered_model_alias("liver-unet-candidates", "shadowed", v2)
    body = json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "data": {"name": "liver-unet-candidates", "alias": "shadowed", "version": str(v2)},
        }
    )
    stamp = str(int(time.time()))
    headers = {"X-MLflow-Delivery-Id": "s-1", "X-MLflow-Timestamp": stamp}
    headers["X-MLflow-Signature"] = _generate_hmac_signature(WEBHOOK_HMAC, "s-1", stamp, body)
    woke = httpx.post(base + "/webhook", content=body, headers=headers).json()
    assert woke == {"action": "reloading", "version": str(v2), "role": ["shadow"]}

    def loaded():
        """the shadow serves v2"""
        return httpx.get(base + "/model").json()["shadow"].get("version") == str(v2)

    _wait(loaded, 60)
    before = scrape(base)
    assert (
        value(before, "liverseg_shadow_model_info", name="liver-unet-candidates", version=str(v2), alias="shadowed")
        == 1
    )
    assert value(before, "liverseg_follow_degraded", role="shadow") == 0
    ct = (real_ct / "volume-0.nii.gz").read_bytes()
    for n in range(1, 4):  # one at a time: the queue holds one request
        r = httpx.post(base + "/segment", content=ct, headers={"X-Request-Id": f"shadowed-{n}"}, timeout=120)
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"  # only the champion answers
        assert np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj).sum() == 0
        assert _logged(shadowed, f"shadowed-{n}")["shadow"] == "queued"

        def compared():
            """the shadow compared the request"""
            return delta(before, scrape(base), "liverseg_shadow_requests_total", outcome="compared") == n  # noqa: B023

        _wait(compared)
    after, ml = scrape(base), _ml(real_ct)
    assert delta(before, after, "liverseg_shadow_dice_count") == 3
    assert delta(before, after, "liverseg_shadow_dice_bucket", le="0.1") == 3  # Dice 0: no overlap at all
    assert delta(before, after, "liverseg_shadow_volume_diff_ml_sum") == pytest.approx(3 * ml)
    assert delta(before, after, "liverseg_shadow_seconds_count") == 3
    (agreement,) = httpx.get(base + "/model").json()["shadow"]["agreement"]
    assert agreement["compared"] == 3 and agreement["dice_mean"] == 0 and agreement["against"] == ["1"]
    assert agreement["volume_diff_ml_max"] == pytest.approx(ml)


@pytest.mark.slow
def test_a_full_shadow_queue_is_counted_never_waited_for(shadowed, real_ct):
    base, ct = shadowed.base, (real_ct / "volume-0.nii.gz").read_bytes()
    before = scrape(base)
    with cf.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: httpx.post(base + "/segment", content=ct, timeout=120), range(6)))
    assert [(r.status_code, r.headers["x-model-version"]) for r in answers] == [(200, "1")] * 6
    after = scrape(base)
    full = delta(before, after, "liverseg_shadow_requests_total", outcome="queue_full")
    queued = delta(before, after, "liverseg_shadow_requests_total", outcome="queued")
    assert full >= 1 and full + queued == 6, (full, queued)  # a queue of one: busy requests are not shadowed


@pytest.mark.slow
def test_evidence_reaches_the_registry_and_ends_at_shutdown(shadowed, real_ct, tracking):
    from mlflow.tracking import MlflowClient

    from liverseg.tracking import tags

    client, ml = MlflowClient(tracking[1]), _ml(real_ct)

    def written():
        """evidence of at least 3 comparisons in the registry"""
        found = read_evidence(client, "liver-unet-candidates", "2")
        return found if found and found.compared >= 3 else None

    summary = _wait(written, 30)
    assert summary.dice_mean == 0 and summary.dice_p05 == 0 and summary.volume_diff_ml_max == pytest.approx(ml)
    assert summary.against == ("1",) and len(summary.replicas) == 1 and summary.since <= summary.updated

    def drained():
        """every queued request compared"""
        now = scrape(shadowed.base)
        done = value(now, "liverseg_shadow_requests_total", outcome="compared")
        return now if done == value(now, "liverseg_shadow_requests_total", outcome="queued") else None

    samples = _wait(drained, 120)
    stop(shadowed.proc)  # SIGTERM: the shadow writes its evidence a last time and ends the run
    final = read_evidence(client, "liver-unet-candidates", "2", against="1")
    assert final.compared == value(samples, "liverseg_shadow_requests_total", outcome="compared")
    assert final.not_shadowed == value(samples, "liverseg_shadow_requests_total", outcome="queue_full")
    (run,) = client.search_runs([client.get_experiment_by_name(tags.SHADOW_EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags[tags.MODEL_VERSION] == "2"
    log = shadowed.log.read_text()
    assert "Traceback" not in log and "warning: shadow" not in log, log[-3000:]
