"""Back-pressure on a real replica: bodies charged by the bytes that arrive (per client and in total),
idle and trickling bodies cut, the model-slot queue bounded, connections bounded. Clients come from
distinct loopback addresses (127.0.0.x): distinct clients to the server."""

import asyncio
import socket
import time

import httpx
import pytest
from fastapi import HTTPException

from liverseg.serving.backpressure import BodyBudget, Pace, Slots
from support.prom import delta, scrape, value
from support.servers import serve_champion
from support.traffic import Trickler

TIGHT = (  # 1 MiB uploads; 3 MiB held at once, 1 MiB per client, 4 uploads per client; 4 s idle / grace
    "serve.max_bodies=3",
    "serve.max_client_bodies=1",
    "serve.max_client_uploads=4",
    "serve.body_idle_s=4",
    "serve.min_upload_kib_s=64",
    "serve.max_queued=1",
)


@pytest.fixture(scope="module")
def tight(module_mlflow, store_path):
    yield from serve_champion(store_path, module_mlflow, 1, 30, *TIGHT)


def _client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=120)


def _stalled(base: str, source: str, declared: int, sent: int) -> socket.socket:
    """A connection from `source` that sends `sent` of `declared` body bytes, then nothing."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))
    sock.sendall(f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n".encode() + bytes(sent))
    return sock


def _answer(sock: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"}"):
        part = sock.recv(65536)
        if not part:
            break
        out += part
    return out


def test_trickling_sockets_hold_nothing_and_are_cut(tight, real_ct):
    """8 connections declaring the largest body and trickling a byte at a time reserved their declared length:
    every other upload and webhook answered 503 for as long as they trickled. Now they hold the bytes
    that came (none to speak of) and are cut once slower than serve.min_upload_kib_s after the grace."""
    body = (real_ct / "volume-0.nii.gz").read_bytes()
    before = scrape(tight.base)
    tricklers = [Trickler(tight.base, f"127.0.0.{10 + i}", declared=1_000_000, every_s=0.3) for i in range(8)]
    for t in tricklers:
        t.start()
    time.sleep(1)
    with _client("127.0.0.2") as c:
        codes = [c.post(tight.base + "/segment", content=body).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    for t in tricklers:
        t.join(60)
    for t in tricklers:
        assert t.status == 408 and b"body slower than 64 KiB/s" in t.answer, t.answer[:300]
        assert 3.5 < t.seconds < 20, t.seconds  # cut after the grace (4 s), not at once
    after = scrape(tight.base)
    assert delta(before, after, "liverseg_refusals_total", status="408", limit="min_upload_kib_s") == 8
    assert value(after, "liverseg_body_bytes_buffered") == 0


def test_budget_counts_bytes_received_per_client_and_in_total(tight, real_ct):
    """Held bytes are what arrived: one client may hold 1 MiB (429 past it), all 3 MiB (503 past it); a
    stalled body is cut after serve.body_idle_s and gives its bytes back."""
    base = tight.base
    a1 = _stalled(base, "127.0.0.21", 1_000_000, 600_000)
    time.sleep(0.3)
    a2 = _stalled(base, "127.0.0.21", 1_000_000, 500_000)  # the same client: 1.1 MB > 1 MiB
    answer = _answer(a2)
    assert answer.startswith(b"HTTP/1.1 429") and b"bytes of yours held (limit 1048576)" in answer, answer
    held = [_stalled(base, f"127.0.0.{22 + i}", 1_000_000, 600_000) for i in range(3)]  # 4 x 600 kB in all
    time.sleep(0.3)
    assert scrape(base)[("liverseg_body_bytes_buffered", ())] == 4 * 600_000
    last = _stalled(base, "127.0.0.26", 1_000_000, 800_000)  # 3.2 MB > 3 MiB over all clients
    answer = _answer(last)
    assert answer.startswith(b"HTTP/1.1 503") and b"bytes of uploads held (limit 3145728)" in answer, answer[:300]
    assert b"retry-after: 10" in answer.lower()
    with _client("127.0.0.27") as c:  # a small upload (483 kB) from someone else still fits
        assert c.post(base + "/segment", content=(real_ct / "volume-0.nii.gz").read_bytes()).status_code == 200
    idle = _answer(a1)  # the stalled ones are cut after serve.body_idle_s, their bytes given back
    assert idle.startswith(b"HTTP/1.1 408") and b"no body bytes for 4 s" in idle, idle[:300]
    for sock in [a1, a2, *held, last]:
        sock.close()
    time.sleep(4.5)
    samples = scrape(base)
    assert value(samples, "liverseg_body_bytes_buffered") == 0
    assert value(samples, "liverseg_refusals_total", status="429", limit="max_client_bodies") == 1
    assert value(samples, "liverseg_refusals_total", status="503", limit="max_bodies") == 1


def test_uploads_per_client_are_bounded_and_forwarded_for_is_not_trusted(tight):
    socks = [_stalled(tight.base, "127.0.0.31", 1_000_000, 10) for _ in range(4)]
    time.sleep(0.3)
    fifth = _stalled(tight.base, "127.0.0.31", 1_000_000, 10)
    assert _answer(fifth).startswith(b"HTTP/1.1 429")
    with _client("127.0.0.31") as c:  # no trusted proxies: X-Forwarded-For names no one
        r = c.post(tight.base + "/segment", content=b"x" * 10, headers={"X-Forwarded-For": "10.9.8.7"})
    assert r.status_code == 429 and "4 uploads of yours under way" in r.json()["detail"]
    assert r.headers["retry-after"] == "10"
    for sock in socks + [fifth]:
        sock.close()


def test_body_budget_charges_what_arrives():
    budget, seen = BodyBudget(limit=100, per_client=60, client_uploads=2), []
    budget.observe = seen.append
    with budget.reserve("a") as a1, budget.reserve("b") as b1:
        a1(10)
        a1(50)  # a request is charged its bytes so far, never more than once
        b1(30)
        with pytest.raises(HTTPException) as err:
            b1(55)  # 105 > 100 over all
        assert err.value.status_code == 503 and err.value.limit == "max_bodies"
        with budget.reserve("a") as a2:
            with pytest.raises(HTTPException) as err:
                a2(11)  # 61 > 60 for client a
            assert err.value.status_code == 429 and err.value.limit == "max_client_bodies"
            with pytest.raises(HTTPException) as err, budget.reserve("a"):
                pass  # a third upload of a's
            assert err.value.limit == "max_client_uploads"
        assert budget.used == 80
    assert budget.used == 0 and budget.clients == {} and seen[-1] == 0


def test_pace_names_the_deadline_that_passes_first():
    pace = Pace(total_s=120, idle_s=10, min_rate=1000)
    assert pace.deadline(0, 0, 0) == (10, "body_idle_s")  # nothing yet: the idle time (and grace) first
    assert pace.deadline(0, 9, 2000) == (12, "min_upload_kib_s")  # 2000 bytes buy 2 s past the grace
    assert pace.deadline(0, 50, 10**9) == (60, "body_idle_s")
    assert pace.deadline(0, 115, 10**9) == (120, "upload_timeout_s")
    assert Pace(120, 10, 0).deadline(0, 30, 5) == (40, "body_idle_s")  # no rate floor


def test_model_slots_bound_the_queue_and_the_wait():
    """Waiting for a slot was unbounded: 70 requests queued, none was ever refused."""

    async def scenario() -> list[str]:
        slots, seen, idle = Slots(1, max_queued=1, timeout_s=0.5), [], []

        async def one() -> None:
            try:
                async with slots.hold():
                    seen.append("ran")
                    idle.append(slots.idle.is_set())
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
        assert slots.idle.is_set() and idle == [False]
        return seen

    assert asyncio.run(scenario()) == [
        "ran",
        "busy: 1 requests already wait for a model slot; retry later",
        "busy: no model slot free within 0.5 s; retry later",
    ]


@pytest.mark.slow
def test_connections_are_bounded_and_late_headers_closed(module_mlflow, store_path):
    """Sockets that never finished their request line kept the server unreachable; out of file
    descriptors, asyncio logged `socket.accept() out of system resource` a million times in 70 s."""
    import resource

    def few_files() -> None:  # as under `ulimit -n 256`
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    sets = ("serve.max_connections=8", "serve.header_timeout_s=2")
    for replica in serve_champion(store_path, module_mlflow, 1, 30, *sets, preexec_fn=few_files):
        base = replica.base
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
        log = replica.log.read_text()
        assert 1 <= log.count("cannot accept connections") <= 2 and "out of system resource" not in log, log[-3000:]
        assert log.count("Exceeded concurrency limit.") == 1, log[-3000:]
