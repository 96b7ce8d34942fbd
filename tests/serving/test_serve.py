"""The REST service, started as a real process on 127.0.0.1 and called over HTTP."""

import gzip
import os
import socket
import subprocess
import sys
import time

import httpx
import nibabel as nib
import numpy as np
import pytest

from support.models import constant_state, log_model_run
from support.net import free_port
from support.nifti import nifti2_declaring
from support.servers import RELOAD_TOKEN, serve_champion


def _nii_bytes(arr, affine=None, gz=True):
    raw = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine).to_bytes()
    return gzip.compress(raw) if gz else raw


def test_segment_health_model_and_bad_requests(server, real_ct):
    import psutil

    base, _ = server
    assert httpx.get(base + "/health").json() == {"status": "ok", "version": "1"}
    port = int(base.rsplit(":", 1)[1])  # started without --host: listens on loopback only
    assert {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"} == {
        "127.0.0.1"
    }
    info = httpx.get(base + "/model").json()
    assert info["name"] == "liver-unet" and info["alias"] == "champion" and info["lineage"]["git_commit"] == "abc123"
    assert info["preprocessing"]["window"] == [-200.0, 250.0]

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
        "gzip bomb": (gzip.compress(bytes(64_000_000)), 413, "too large"),  # 62 KB that inflate to 64 MB
    }
    for label, (payload, status, fragment) in bad.items():
        r = httpx.post(base + "/segment", content=payload, timeout=60)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert fragment in r.json()["detail"], (label, r.text)
    assert httpx.get(base + "/health").status_code == 200  # still up


def _raw_request(base: str, declared: int, sent: bytes, close: bool, path: str = "/segment") -> bytes:
    """POST `path` by hand: `declared` Content-Length, `sent` bytes of body; close or wait for the answer."""
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


def test_hostile_uploads_get_one_line_4xx(server, tmp_path):
    """Nested gzip, RGB and complex voxels, a short body, a client that leaves: 4xx, no hang, no traceback."""
    base, _ = server
    vol = np.zeros((8, 8, 4), np.int16)
    rgb = np.zeros((8, 8, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")])
    bad = {
        "nested gzip bomb": (gzip.compress(gzip.compress(bytes(64_000_000))), 413, "too large"),
        "RGB voxels": (_nii_bytes(rgb), 400, "voxel type RGB is not a real scalar"),
        "complex voxels": (_nii_bytes(vol.astype(np.complex64)), 400, "voxel type complex64 is not a real scalar"),
        # 128 bytes declaring 16384 slices, each resized to the model size: was 43 s and 2.5 GB for a 200
        "many slices": (_nii_bytes(np.zeros((1, 1, 16384), np.int16)), 413, "16384 axial slices exceed the limit"),
        "NIfTI-2 dims overflowing int64": (gzip.compress(nifti2_declaring((2**62, 4, 1))), 400, "exceeds the data"),
        "NIfTI-2 of 2**120 voxels": (nifti2_declaring((2**40, 2**40, 2**40)), 400, "exceeds the data"),
        "trailing garbage": (_nii_bytes(vol) + b"garbage", 400, "7 bytes of trailing garbage"),
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
    log = next(tmp_path.glob("serve-*.log")).read_text()
    assert "Traceback" not in log and "Exception" not in log, log[-2000:]


def test_busy_server_sheds_load_with_503_and_health_answers(mlflow_uri, store_path, tmp_path, real_ct):
    """Bodies being received were buffered without a bound over all requests (300 held-open uploads:
    +1 GB), and requests waited for a model slot in the thread pool that /health needed too."""
    sets = ("serve.max_bodies=2", "serve.max_queued=1")  # 2 MiB of bodies at once
    for base, _ in serve_champion(store_path, tmp_path, 1, 30, *sets):
        held = [socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) for _ in range(2)]
        for sock in held:  # two uploads of 1,000,000 bytes announced, 10 sent: their bytes are reserved
            sock.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + bytes(10))
        time.sleep(0.5)  # both reach the app before the third
        third = _raw_request(base, 200_000, b"", close=False)
        assert third.startswith(b"HTTP/1.1 503") and b"retry-after: 10" in third.lower(), third[:300]
        assert b"bytes of uploads buffered (limit 2097152)" in third
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        for sock in held:
            sock.close()
        body = (real_ct / "volume-0.nii.gz").read_bytes()
        codes = [httpx.post(base + "/segment", content=body, timeout=120).status_code for _ in range(20)]
        assert 200 in codes and set(codes) <= {200, 503}, codes  # the reservations were given back
        assert codes[-1] == 200, codes


def test_model_slots_bound_the_queue_and_the_wait():
    """Waiting for a slot was unbounded: 70 requests queued, none was ever refused."""
    import asyncio

    from fastapi import HTTPException

    from liverseg.serving.backpressure import Slots

    async def scenario() -> list[str]:
        slots, seen = Slots(1, max_queued=1, timeout_s=0.5), []

        async def one() -> None:
            try:
                async with slots.hold():
                    seen.append("ran")
                    await asyncio.sleep(2)
            except HTTPException as e:
                assert e.status_code == 503 and e.headers == {"Retry-After": "10"}
                seen.append(e.detail)

        first = asyncio.create_task(one())
        await asyncio.sleep(0.05)  # holds the slot
        waiting = asyncio.create_task(one())
        await asyncio.sleep(0.05)
        await one()  # the queue is full: refused at once
        await asyncio.gather(first, waiting)
        return seen

    assert asyncio.run(scenario()) == [
        "ran",
        "busy: 1 requests already wait for a model slot; retry later",
        "busy: no model slot free within 0.5 s; retry later",
    ]


def test_connections_are_bounded_and_late_headers_closed(mlflow_uri, store_path, tmp_path):
    """Sockets that never finished their request line kept the server unreachable; out of file
    descriptors, asyncio logged `socket.accept() out of system resource` a million times in 70 s."""
    import resource

    def few_files() -> None:  # as under `ulimit -n 256`
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    sets = ("serve.max_connections=8", "serve.header_timeout_s=2")
    for base, _ in serve_champion(store_path, tmp_path, 1, 30, *sets, preexec_fn=few_files):
        addr = ("127.0.0.1", int(base.rsplit(":", 1)[1]))
        partial = [socket.create_connection(addr, timeout=30) for _ in range(7)]
        for sock in partial:
            sock.sendall(b"GET /hea")
        time.sleep(0.5)
        for _ in range(5):  # the 8th connection: refused, and said in the log once
            assert httpx.get(base + "/health", timeout=10).status_code == 503
        assert all(sock.recv(100) == b"" for sock in partial)  # closed by the server after 2 s
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        flood = []
        for _ in range(400):  # more than the process may open
            flood.append(socket.create_connection(addr, timeout=30))
            flood[-1].sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(3)
        for sock in flood:
            sock.close()
        for _ in range(20):  # accepting resumes once the late ones are closed
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        log = next(tmp_path.glob("serve-*.log")).read_text()
        assert 1 <= log.count("cannot accept connections") <= 2 and "out of system resource" not in log, log[-3000:]
        assert log.count("Exceeded concurrency limit.") == 1, log[-3000:]


def test_reload_follows_the_alias(server, real_ct, store_path):
    from mlflow.tracking import MlflowClient

    from liverseg.registry.register import register
    from liverseg.tracking.runs import tracking_uri

    base, _ = server
    body = (real_ct / "volume-0.nii.gz").read_bytes()
    before = nib.Nifti1Image.from_bytes(
        gzip.decompress(httpx.post(base + "/segment", content=body, timeout=120).content)
    )
    assert np.asanyarray(before.dataobj).sum() == 0  # v1 predicts no liver
    run, _ = log_model_run(constant_state(liver=True), store_path=store_path)
    mv = register(run_id=run)  # a candidate; served once copied into liver-unet (as promote does)
    client = MlflowClient(tracking_uri())
    served = client.copy_model_version(f"models:/{mv.name}/{mv.version}", "liver-unet")
    client.set_registered_model_alias("liver-unet", "champion", served.version)
    assert httpx.post(base + "/reload", timeout=120).status_code == 401  # no token
    bad = httpx.post(base + "/reload", headers={"Authorization": "Bearer wrong"}, timeout=120)
    assert bad.status_code == 401 and httpx.get(base + "/health").json()["version"] == "1"
    auth = {"Authorization": f"Bearer {RELOAD_TOKEN}"}
    assert httpx.post(base + "/reload", headers=auth, timeout=120).json() == {"previous_version": "1", "version": "2"}
    r = httpx.post(base + "/segment", content=body, timeout=120)
    after = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert r.headers["x-model-version"] == "2" and np.asanyarray(after.dataobj).all()


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
