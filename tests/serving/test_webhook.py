"""Webhook signature checks (against MLflow's own signer) and replicas that follow the champion:
a real `mlflow server` sending real webhook deliveries to real `liverseg serve` processes."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import httpx
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from liverseg.serving.webhook import Verifier, WebhookRejected
from support.models import constant_state, log_model_run
from support.servers import start_mlflow_server, start_serve, stop
from support.traffic import TrafficClient, wait_version

SECRET = secrets.token_urlsafe(24)  # generated per run, handed to replicas through their environment


def _delivery(data: dict, secret: str = SECRET, stamp: int | None = None, delivery: str = "d-1"):
    """Headers and body exactly as MLflow 3.17 sends them (its own signing function)."""
    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "x", "data": data})
    stamp = str(int(time.time()) if stamp is None else stamp)
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, stamp, body),
    }
    return headers, body.encode()


EVENT = {"name": "liver-unet-prod", "alias": "champion", "version": "7"}


def test_verifier_accepts_mlflow_signature_and_refuses_forgeries():
    v = Verifier(SECRET, max_age_s=300)
    headers, body = _delivery(EVENT)
    ev = v.verify(headers, body, time.time())
    assert (ev.name, ev.alias, ev.version) == ("liver-unet-prod", "champion", "7")

    def refused(h, b, now=None, verifier=v):
        with pytest.raises(WebhookRejected) as e:
            verifier.verify(h, b, time.time() if now is None else now)
        return e.value.status, str(e.value)

    assert refused(headers, body)[0] == 401  # the same delivery again: replay
    h2, b2 = _delivery(EVENT, delivery="d-2")
    assert refused(h2, b2.replace(b'"7"', b'"8"')) == (
        401,
        "bad signature: not signed with this replica's webhook secret",
    )
    h3, b3 = _delivery(EVENT, secret="other", delivery="d-3")
    assert refused(h3, b3)[0] == 401
    h4, b4 = _delivery(EVENT, stamp=int(time.time()) - 3600, delivery="d-4")
    assert "stale delivery" in refused(h4, b4)[1]  # correctly signed, an hour old
    h5, b5 = _delivery(EVENT, delivery="d-5")
    assert "unsigned" in refused({k: x for k, x in h5.items() if k != "X-MLflow-Signature"}, b5)[1]
    assert refused(h5, b5, verifier=Verifier(None, 300))[0] == 403  # no secret configured: disabled
    other = json.dumps({"entity": "model_version", "action": "created", "data": {}})
    h6 = {**h5, "X-MLflow-Delivery-Id": "d-6"}
    h6["X-MLflow-Signature"] = _generate_hmac_signature(SECRET, "d-6", h5["X-MLflow-Timestamp"], other)
    assert v.verify(h6, other.encode(), time.time()) is None  # authentic, but not an alias event


def test_signed_bodies_are_parsed_only_within_depth_and_size():
    """A signed body of 30,000 nested brackets raised RecursionError in json.loads: a 500."""
    from liverseg.serving.webhook import json_depth, parse_event

    assert json_depth(b'{"a": [1, {"b": "]]]}}}[[[[\\""}]}') == 3  # brackets in strings do not count
    for body, why in (
        (b"[" * 30_000 + b"]" * 30_000, "nests deeper than 16 levels"),
        (b'{"x": "' + b"y" * 70_000 + b'"}', "exceeds the limit of 65536"),
        (b'{"entity": "model_version_alias", "action": "created", "data": [[]]}', "not an MLflow webhook payload"),
    ):
        with pytest.raises(WebhookRejected, match=why) as e:
            parse_event("d", body)
        assert e.value.status == 400
    nested = json.dumps({"entity": "x", "data": [[[[{"a": 1}]]]]}).encode()
    assert parse_event("d", nested) is None  # authentic, of another kind, within the depth


@pytest.fixture
def webhook_mlflow(tmp_path, monkeypatch):
    """A tracking server that may deliver webhooks over http to 127.0.0.1 (as a cluster's would to pods)."""
    env = {
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",  # the server caches the webhook list (60 s by default)
    }
    server = start_mlflow_server(tmp_path, env=env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.chdir(tmp_path)
    yield server.uri
    server.stop()


def _new_version(liver: bool, name: str) -> str:
    from mlflow.tracking import MlflowClient

    from liverseg.registry.register import register

    run, _ = log_model_run(constant_state(liver=liver))
    mv = register(run_id=run, name=name)  # @challenger on NAME-candidates: an alias event the replicas ignore
    return str(MlflowClient().copy_model_version(f"models:/{mv.name}/{mv.version}", name).version)


@pytest.mark.slow
def test_replicas_follow_champion_by_webhook_and_by_polling(webhook_mlflow, tmp_path):
    from mlflow.tracking import MlflowClient

    from liverseg.serving.webhook import add_webhook, remove_webhook

    name, client = "liver-unet-prod", MlflowClient(webhook_mlflow)
    client.set_registered_model_alias(name, "champion", _new_version(False, name))
    model = f"models:/{name}@champion"
    # replica A: webhook only (polling off); replica B: no webhook secret, polls every second
    (a, base_a), (b, base_b) = (
        start_serve(tmp_path, model, {"LIVERSEG_WEBHOOK_SECRET": SECRET, "LIVERSEG_RELOAD_TOKEN": "t"}, *opts)
        for opts in (("--set", "serve.poll_s=0"), ("--set", "serve.poll_s=1"))
    )
    try:
        add_webhook(base_a + "/webhook", SECRET)
        again = subprocess.run(  # the command an admin runs per replica; idempotent per URL
            [sys.executable, "-m", "liverseg.cli", "webhook", "add", base_a + "/webhook"],
            env={**os.environ, "LIVERSEG_WEBHOOK_SECRET": SECRET},
            capture_output=True,
            text=True,
        )
        assert again.returncode == 0 and "model_version_alias.created" in again.stdout, again.stderr
        assert [w.url for w in client.list_webhooks()] == [base_a + "/webhook"]
        since_a = httpx.get(base_a + "/model").json()["since"]

        # forged, stale and foreign deliveries change nothing
        h, body = _delivery({**EVENT, "version": "1"}, secret="wrong")
        assert httpx.post(base_a + "/webhook", headers=h, content=body).status_code == 401
        h, body = _delivery(EVENT, stamp=int(time.time()) - 3600)
        assert httpx.post(base_a + "/webhook", headers=h, content=body).status_code == 401
        h, body = _delivery({**EVENT, "alias": "challenger"}, delivery="d-9")
        r = httpx.post(base_a + "/webhook", headers=h, content=body)
        assert r.status_code == 202 and r.json()["action"] == "ignored"
        assert httpx.post(base_b + "/reload").status_code == 401  # no bearer token

        load = TrafficClient([base_a, base_b])
        load.start()
        time.sleep(1)
        v2 = _new_version(True, name)  # registering sets @challenger: an alias event the replicas ignore
        t_set = time.time()
        client.set_registered_model_alias(name, "champion", v2)
        latency = {base: wait_version(base, v2) - t_set for base in (base_a, base_b)}
        assert httpx.get(base_a + "/model").json()["since"] > since_a  # UTC ISO times compare as strings
        time.sleep(1)
        load.done.set()
        load.join(timeout=120)
        assert remove_webhook(base_a + "/webhook") == 1 and not client.list_webhooks()
    finally:
        stop(a)
        stop(b)
    print(f"alias-to-new-version latency: webhook {latency[base_a]:.2f} s, polling(1 s) {latency[base_b]:.2f} s")
    for base, seen in load.seen.items():
        assert seen and all(status == 200 for status, _ in seen), (base, seen)
        versions = [v for _, v in seen]
        assert versions == sorted(versions, key=int) and versions[-1] == v2, (base, versions)  # 1...1 2...2
