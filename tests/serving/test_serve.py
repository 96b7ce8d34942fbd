"""The REST service, started once as a real process on 127.0.0.1 (module-scoped `server`) and called over
HTTP: answers, refusals, metrics, the access log, webhooks; then (last, as they move the champion) reload
and a champion that cannot be loaded."""

import gzip
import io
import json
import os
import subprocess
import sys
import time

import httpx
import nibabel as nib
import numpy as np
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from support.models import constant_state, log_model_run
from support.net import free_port
from support.nifti import nifti2_declaring
from support.prom import delta, scrape, value
from support.servers import RELOAD_TOKEN, WEBHOOK_HMAC


def _nii_bytes(arr, affine=None, gz=True):
    raw = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine).to_bytes()
    return gzip.compress(raw) if gz else raw


def _header_then(dims, dtype, tail: bytes) -> bytes:
    """A NIfTI-1 header declaring `dims` of `dtype`, followed by `tail` instead of its voxels."""
    raw = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), np.eye(4)).to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    hdr.set_data_shape(dims)
    return hdr.binaryblock + raw[348:352] + tail


def test_segment_health_model_and_bad_requests(server, real_ct):
    import psutil

    base = server.base
    assert httpx.get(base + "/health").json() == {"status": "ok", "version": "1"}
    port = int(base.rsplit(":", 1)[1])  # started without --host: listens on loopback only
    assert {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"} == {
        "127.0.0.1"
    }
    info = httpx.get(base + "/model").json()
    assert info["name"] == "liver-unet" and info["alias"] == "champion" and info["lineage"]["git_commit"] == "abc123"
    assert info["preprocessing"]["window"] == [-200.0, 250.0]
    assert info["status"] == "ok" and info["follow_error"] is None and info["shadow"] is None

    body = (real_ct / "volume-0.nii.gz").read_bytes()
    r = httpx.post(base + "/segment", content=body, timeout=120)
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    src = nib.load(str(real_ct / "volume-0.nii.gz"))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine) and mask.get_data_dtype() == np.uint8
    raw = gzip.decompress(body)
    plain = httpx.post(base + "/segment", content=raw, timeout=120)
    assert plain.status_code == 200  # uncompressed .nii works too
    members = gzip.compress(raw[:5000]) + gzip.compress(raw[5000:])  # as bgzip writes: was 400 "truncated"
    assert httpx.post(base + "/segment", content=members, timeout=120).status_code == 200
    tiny = gzip.compress(raw[:100]) + gzip.compress(raw[100:])  # the header spans two members
    assert httpx.post(base + "/segment", content=tiny, timeout=120).status_code == 200

    vol = np.zeros((8, 8, 4), np.int16)
    nan = vol.astype(np.float32)
    nan[0, 0, 0] = np.nan
    bad = {
        "empty": (b"", 400, "empty body"),
        "not nifti": (b"hello world" * 50, 400, "not a NIfTI"),
        "truncated gzip": (body[: len(body) // 3], 400, "cannot decode"),
        "2-D": (_nii_bytes(vol[:, :, 0]), 400, "2-D"),
        "4-D": (_nii_bytes(np.stack([vol, vol], -1)), 400, "4-D"),
        "NaN": (_nii_bytes(nan), 400, "non-finite"),
        "too large": (os.urandom(1_200_000), 413, "limit"),
        "gzip of zeros": (gzip.compress(bytes(64_000_000)), 400, "not a NIfTI"),  # refused on its first bytes
    }
    for label, (payload, status, fragment) in bad.items():
        r = httpx.post(base + "/segment", content=payload, timeout=60)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert fragment in r.json()["detail"], (label, r.text)
    assert httpx.get(base + "/health").status_code == 200  # still up


def _raw_request(base: str, declared: int, sent: bytes, close: bool, path: str = "/segment") -> bytes:
    """POST `path` by hand: `declared` Content-Length, `sent` bytes of body; close or wait for the answer."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {declared}\r\n\r\n"
        sock.sendall(head.encode() + sent)
        answer = b""
        while not close and not answer.endswith(b"}"):  # the JSON detail ends the answer
            part = sock.recv(65536)
            if not part:
                break
            answer += part
        return answer


def test_hostile_uploads_get_one_line_4xx_before_decoding(server):
    """Nested gzip, RGB and complex voxels, sizes a header declares, a short body, a client that leaves:
    4xx naming the limit, no hang, no traceback. A 1.1 MB upload of 16000 x 16000 x 1 voxels was answered
    200 after 14 s, +2.4 GB: now every dimension is checked on the header, before any voxel is decoded."""
    base = server.base
    vol = np.zeros((8, 8, 4), np.int16)
    rgb = np.zeros((8, 8, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")])
    bomb = _header_then((8, 8, 4), np.uint8, bytes(64_000_000))  # a small volume's header, then 64 MB
    bad = {
        "nested gzip of zeros": (gzip.compress(gzip.compress(bytes(64_000_000))), 400, "not a NIfTI"),
        "bomb behind a small header": (gzip.compress(bomb), 413, "decompresses to more than 1049184 bytes"),
        "nested bomb": (gzip.compress(gzip.compress(bomb)), 413, "its header declares 608"),
        "RGB voxels": (_nii_bytes(rgb), 400, "voxel type RGB is not a real scalar"),
        "complex voxels": (_nii_bytes(vol.astype(np.complex64)), 400, "voxel type complex64 is not a real scalar"),
        # 128 bytes declaring 16384 slices, each resized to the model size: was 43 s and 2.5 GB for a 200
        "many slices": (_nii_bytes(np.zeros((1, 1, 16384), np.int16)), 413, "(serve.max_slices)"),
        "in-plane 16000 x 16000": (gzip.compress(_header_then((16000, 16000, 1), np.uint8, b"")), 413, "16000 x 16000"),
        "voxels": (gzip.compress(_header_then((2048, 2048, 128), np.uint8, b"")), 413, "(serve.max_voxels)"),
        "decoded bytes": (gzip.compress(_header_then((512, 512, 600), np.float64, b"")), 413, "max_decoded_mb"),
        "NIfTI-2 dims overflowing int64": (gzip.compress(nifti2_declaring((2**62, 4, 1))), 413, "max_inplane"),
        "NIfTI-2 of 2**120 voxels": (nifti2_declaring((2**40, 2**40, 2**40)), 400, "exceeds the data"),
        "trailing garbage": (_nii_bytes(vol) + b"garbage", 400, "7 bytes of trailing garbage"),
        "quine-like nesting": (_nested(vol, 20), 400, "nested gzip layers"),
    }
    for label, (payload, status, fragment) in bad.items():
        r = httpx.post(base + "/segment", content=payload, timeout=60)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert fragment in r.json()["detail"] and "\n" not in r.json()["detail"], (label, r.text)
    short = _raw_request(base, 5000, b"x" * 100, close=False)  # the rest never comes
    assert short.startswith(b"HTTP/1.1 408") and b"not received within 3 s" in short, short[:200]
    hook = _raw_request(base, 5000, b"{", close=False, path="/webhook")  # the webhook route has the same deadline
    assert hook.startswith(b"HTTP/1.1 408"), hook[:200]
    _raw_request(base, 500_000, b"x" * 1000, close=True)  # the client goes away mid-upload
    time.sleep(1)  # let the server notice before the log is read
    assert httpx.get(base + "/health").status_code == 200
    log = server.log.read_text()
    assert "Traceback" not in log and "Exception" not in log, log[-2000:]


def _nested(vol: np.ndarray, layers: int) -> bytes:
    data = _nii_bytes(vol, gz=False)
    for _ in range(layers):
        data = gzip.compress(data)
    return data


def test_metrics_count_requests_by_route_and_status(server, real_ct):
    """GET /metrics in the Prometheus text format, read back with prometheus_client's parser: requests by
    route and status, latency histogram counts, bytes in, voxels, refusals by limit, the served model."""
    base = server.base
    good = (real_ct / "volume-0.nii.gz").read_bytes()
    voxels = int(np.prod(nib.load(str(real_ct / "volume-0.nii.gz")).shape))
    before = scrape(base)
    sent = {200: [good, good], 400: [b"not a nifti" * 10], 413: [os.urandom(1_100_000)]}
    for status, bodies in sent.items():
        for body in bodies:
            assert httpx.post(base + "/segment", content=body, timeout=120).status_code == status
    assert httpx.get(base + "/health").status_code == 200
    after = scrape(base)
    for status, bodies in sent.items():
        assert delta(before, after, "liverseg_requests_total", route="/segment", status=str(status)) == len(bodies)
    assert delta(before, after, "liverseg_request_seconds_count", route="/segment") == 4
    assert delta(before, after, "liverseg_request_seconds_bucket", route="/segment", le="+Inf") == 4
    read = sum(len(b) for b in sent[200] + sent[400])  # the 413 was refused on its Content-Length, unread
    assert delta(before, after, "liverseg_request_bytes_total", route="/segment") == read
    assert delta(before, after, "liverseg_voxels_segmented_total") == 2 * voxels
    assert delta(before, after, "liverseg_refusals_total", status="413", limit="max_upload_mb") == 1
    assert delta(before, after, "liverseg_requests_total", route="/health", status="200") == 1
    assert delta(before, after, "liverseg_requests_total", route="/metrics", status="200") == 1  # the first scrape
    assert value(after, "liverseg_model_info", name="liver-unet", version="1", alias="champion") == 1
    assert value(after, "liverseg_model_loads_total", role="champion", outcome="ok") == 1
    assert value(after, "liverseg_follow_degraded", role="champion") == 0
    assert value(after, "liverseg_queue_depth") == 0 and value(after, "liverseg_body_bytes_buffered") == 0
    assert value(after, "process_resident_memory_bytes") > 0
    assert httpx.get(base + "/no-such-route").status_code == 404
    assert delta(after, scrape(base), "liverseg_requests_total", route="other", status="404") == 1  # bounded labels


def test_access_log_is_one_json_line_per_request_with_its_id(server, real_ct):
    base = server.base
    r = httpx.post(
        base + "/segment",
        content=(real_ct / "volume-0.nii.gz").read_bytes(),
        headers={"X-Request-Id": "scan-42.a:b"},
        timeout=120,
    )
    assert r.headers["x-request-id"] == "scan-42.a:b"
    given = {"bad": "has space", "long": "x" * 200, "json": '"}{'}
    ids = {
        k: httpx.get(base + "/health", headers={"X-Request-Id": v}).headers["x-request-id"] for k, v in given.items()
    }
    assert all(len(i) == 32 and i not in given.values() for i in ids.values()), ids  # replaced by new ones
    httpx.post(base + "/reload", headers={"Authorization": "Bearer not-the-token"})
    big = httpx.post(base + "/segment", content=bytes(1_100_000), headers={"X-Request-Id": "too-big"})
    assert big.status_code == 413
    time.sleep(0.5)
    lines = [json.loads(x) for x in server.log_lines() if x.startswith("{")]
    by_id = {x["request_id"]: x for x in lines}
    seg = by_id["scan-42.a:b"]
    assert seg["route"] == "/segment" and seg["status"] == 200 and seg["model_version"] == "1"
    assert seg["bytes_in"] == (real_ct / "volume-0.nii.gz").stat().st_size and seg["bytes_out"] == len(r.content)
    assert seg["client"] == "127.0.0.1" and seg["method"] == "POST" and seg["seconds"] > 0 and seg["time"].endswith("Z")
    assert seg["shadow"] is None and seg["limit"] is None
    assert all(by_id[i]["route"] == "/health" for i in ids.values())
    text = server.log.read_text()
    assert "not-the-token" not in text and RELOAD_TOKEN not in text and "has space" not in text
    assert by_id["too-big"]["limit"] == "max_upload_mb" and by_id["too-big"]["status"] == 413


def test_signed_webhook_bodies_are_checked_for_depth_and_size(server):
    """A signed delivery of 30,000 nested brackets answered 500 (RecursionError in the JSON parser)."""

    def signed(body: str, delivery: str) -> dict:
        stamp = str(int(time.time()))
        sig = _generate_hmac_signature(WEBHOOK_HMAC, delivery, stamp, body)
        return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": sig}

    deep = "[" * 30_000 + "]" * 30_000
    r = httpx.post(server.base + "/webhook", content=deep, headers=signed(deep, "deep-1"))
    assert r.status_code == 400 and "nests deeper than 16 levels" in r.json()["detail"], r.text
    big = json.dumps({"entity": "x", "pad": "y" * 70_000})
    r = httpx.post(server.base + "/webhook", content=big, headers=signed(big, "big-1"))
    assert r.status_code == 413 and r.json()["detail"].startswith("body of 70"), r.text
    ok = json.dumps(
        {"entity": "model_version_alias", "action": "created", "data": {"name": "x", "alias": "y", "version": "1"}}
    )
    r = httpx.post(server.base + "/webhook", content=ok, headers=signed(ok, "ok-1"))
    assert r.status_code == 202 and r.json()["action"] == "ignored"
    assert "Traceback" not in server.log.read_text()


# --- the champion moves (these run last: they change what the module's replica serves) ----------------


def test_reload_follows_the_alias(server, real_ct, store_path):
    from mlflow.tracking import MlflowClient

    from liverseg.registry.register import register
    from liverseg.tracking.runs import tracking_uri

    base = server.base
    body = (real_ct / "volume-0.nii.gz").read_bytes()
    before = nib.Nifti1Image.from_bytes(
        gzip.decompress(httpx.post(base + "/segment", content=body, timeout=120).content)
    )
    assert np.asanyarray(before.dataobj).sum() == 0  # v1 predicts no liver
    run, _ = log_model_run(constant_state(liver=True), store_path=store_path)
    mv = register(run_id=run)  # a candidate; served once copied into liver-unet (as promote does)
    client = MlflowClient(tracking_uri())
    served = client.copy_model_version(f"models:/{mv.name}/{mv.version}", "liver-unet")
    assert httpx.post(base + "/reload", timeout=120).status_code == 401  # no token
    client.set_registered_model_alias("liver-unet", "champion", served.version)
    bad = httpx.post(base + "/reload", headers={"Authorization": "Bearer wrong"}, timeout=120)
    assert bad.status_code == 401
    auth = {"Authorization": f"Bearer {RELOAD_TOKEN}"}
    r = httpx.post(base + "/reload", headers=auth, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == "2", r.text  # the poller may have switched first
    r = httpx.post(base + "/segment", content=body, timeout=120)
    after = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert r.headers["x-model-version"] == "2" and np.asanyarray(after.dataobj).all()
    samples = scrape(base)
    assert value(samples, "liverseg_model_info", name="liver-unet", version="2", alias="champion") == 1
    assert ("liverseg_model_info", (("alias", "champion"), ("name", "liver-unet"), ("version", "1"))) not in samples
    assert value(samples, "liverseg_model_switches_total", role="champion") >= 1


@pytest.mark.slow
def test_a_champion_that_cannot_load_degrades_health_and_backs_off(server, real_ct):
    """A replica that could not load the new champion said "ok" and downloaded the full weights again at
    every poll. Now /health says degraded (with the version and the reason), the old version keeps
    answering, and the failing version is retried after 1, 2, 4, 4 ... s (serve.retry_max_s=4), not at
    every 1 s poll; a good version is then taken at once."""
    from mlflow.tracking import MlflowClient

    from liverseg.tracking import tags
    from liverseg.tracking.runs import tracking_uri

    base, client = server.base, MlflowClient(tracking_uri())
    broken = client.copy_model_version("models:/liver-unet-candidates/1", "liver-unet")
    client.set_model_version_tag("liver-unet", broken.version, tags.WEIGHTS_SHA256, "0" * 64)  # digest mismatch
    before = scrape(base)
    client.set_registered_model_alias("liver-unet", "champion", broken.version)
    t0 = time.time()
    while httpx.get(base + "/health").json()["status"] != "degraded" and time.time() - t0 < 30:
        time.sleep(0.2)
    health = httpx.get(base + "/health").json()
    assert health["status"] == "degraded" and health["version"] == "2", health
    assert f"cannot load v{broken.version} of models:/liver-unet@champion" in health["reason"]
    assert "does not match" in health["reason"] and "still serving v2" in health["reason"]
    r = httpx.post(base + "/segment", content=(real_ct / "volume-0.nii.gz").read_bytes(), timeout=120)
    assert r.status_code == 200 and r.headers["x-model-version"] == "2"
    time.sleep(10)  # 10 polls; the backoff allows about 4 attempts in that time
    after = scrape(base)
    attempts = delta(before, after, "liverseg_model_loads_total", role="champion", outcome="failed")
    assert 2 <= attempts <= 6, attempts  # without the backoff: one per poll, 12
    assert value(after, "liverseg_follow_degraded", role="champion") == 1
    assert httpx.get(base + "/model").json()["status"] == "degraded"
    client.set_registered_model_alias("liver-unet", "champion", "1")
    t0 = time.time()
    while httpx.get(base + "/health").json() != {"status": "ok", "version": "1"} and time.time() - t0 < 30:
        time.sleep(0.2)
    assert httpx.get(base + "/health").json() == {"status": "ok", "version": "1"}
    assert "Traceback" not in server.log.read_text()


@pytest.mark.slow
def test_mlflow_models_serve_works_as_is(mlflow_uri, tmp_path):
    """`mlflow models serve -m models:/liver-unet-candidates/1` answers with a mask on the volume's grid."""
    from liverseg.registry.register import register

    run, _ = log_model_run(constant_state(liver=True))
    version = register(run_id=run).version  # in liver-unet-candidates
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [
            os.path.join(bin_dir, "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/liver-unet-candidates/{version}",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        vol = np.full((32, 32, 4), 60.0)
        r = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"inputs": {"volume": vol.tolist(), "affine": np.eye(4).tolist()}},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        mask = np.array(r.json()["predictions"])
        assert mask.shape == (32, 32, 4) and mask.min() == 1
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
