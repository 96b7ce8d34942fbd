"""Back-pressure: what a busy replica refuses rather than queue without bound. Request bodies are read
within a size, a deadline, an idle time and a floor on their rate, and the bytes received are counted
against one budget over all requests and a share of it per client; the model slots are awaited on the
event loop by a bounded queue for a bounded time. Past any of them: 413, 408, 429 or 503 (with
Retry-After), naming the `serve.*` key that refused.

Every refusal is an HTTPException carrying `limit`, the key's name, which the access log and
`liverseg_refusals_total` report.
"""

# No `from __future__ import annotations`: FastAPI may read annotations at runtime.
import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

RETRY_AFTER_S = 10  # a busy server's hint to clients: about one segmentation of a small volume on CPU


def refuse(status: int, limit: str, detail: str) -> Exception:
    """An HTTPException naming the limit that refused; 429 and 503 tell the client when to retry."""
    from fastapi import HTTPException

    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    exc = HTTPException(status, detail, headers)
    exc.limit = limit
    return exc


def busy(limit: str, detail: str) -> Exception:
    """A 503 with Retry-After: the server sheds load rather than queueing without bound."""
    return refuse(503, limit, detail)


class BodyBudget:
    """Bytes of request bodies received and held at once, over all requests (`limit`) and per client
    (`per_client`), and bodies under way per client (`client_uploads`); used on the event loop only.

    A request is charged the bytes that have arrived, as they arrive (never what it declares), and gives
    them back when answered: declaring 512 MiB and trickling holds nothing, and one client cannot hold
    more than its share. `observe(used)` is told every change (a gauge)."""

    def __init__(
        self, limit: int, per_client: int, client_uploads: int, observe: Callable[[int], None] = lambda used: None
    ):
        self.limit, self.per_client, self.client_uploads, self.observe = limit, per_client, client_uploads, observe
        self.used = 0
        self.clients: dict[str, list[int]] = {}  # client address -> [bytes held, bodies under way]

    @contextlib.contextmanager
    def reserve(self, client: str):
        """Yields `upto(n)`: this request now holds n bytes (503 past the budget, 429 past the client's)."""
        mine = self.clients.setdefault(client, [0, 0])
        if mine[1] >= self.client_uploads:
            raise refuse(429, "max_client_uploads", f"too many requests: {mine[1]} uploads of yours under way")
        mine[1] += 1
        held = 0

        def upto(n: int) -> None:
            nonlocal held
            if n <= held:
                return
            if self.used + n - held > self.limit:
                raise busy("max_bodies", f"busy: {self.used} bytes of uploads held (limit {self.limit}); retry later")
            if mine[0] + n - held > self.per_client:
                raise refuse(
                    429,
                    "max_client_bodies",
                    f"too many requests: {mine[0]} bytes of yours held (limit {self.per_client})",
                )
            self.used, mine[0], held = self.used + n - held, mine[0] + n - held, n
            self.observe(self.used)

        try:
            yield upto
        finally:
            self.used -= held
            mine[0] -= held
            mine[1] -= 1
            if mine[1] == 0:
                del self.clients[client]
            self.observe(self.used)


class Slots:
    """The model slots, awaited on the event loop (no thread waits), by at most `max_queued` requests at
    a time and for at most `timeout_s` each; past either a 503. `idle` is set while no request holds or
    awaits a slot (the shadow waits for it); `observe(waiting, busy)` is told every change."""

    def __init__(
        self,
        n: int,
        max_queued: int,
        timeout_s: float,
        observe: Callable[[int, int], None] = lambda waiting, busy: None,
    ):
        self._sem = asyncio.Semaphore(n)
        self.max_queued, self.timeout_s, self.observe = max_queued, timeout_s, observe
        self.waiting = self.busy = 0
        self.idle = threading.Event()
        self.idle.set()

    def _changed(self, waiting: int = 0, busy: int = 0) -> None:
        self.waiting, self.busy = self.waiting + waiting, self.busy + busy
        if self.waiting or self.busy:
            self.idle.clear()
        else:
            self.idle.set()
        self.observe(self.waiting, self.busy)

    @contextlib.asynccontextmanager
    async def hold(self):
        if self._sem.locked() and self.waiting >= self.max_queued:
            raise busy("max_queued", f"busy: {self.waiting} requests already wait for a model slot; retry later")
        self._changed(waiting=1)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._sem.acquire()
        except TimeoutError:
            raise busy(
                "queue_timeout_s", f"busy: no model slot free within {self.timeout_s:g} s; retry later"
            ) from None
        finally:
            self._changed(waiting=-1)
        self._changed(busy=1)
        try:
            yield
        finally:
            self._sem.release()
            self._changed(busy=-1)


@dataclass(frozen=True)
class Pace:
    """How fast a body must arrive: all of it within `total_s`, no pause longer than `idle_s`, and after
    `idle_s` (the grace) at least `min_rate` bytes/s on average since its start (0: no floor)."""

    total_s: float
    idle_s: float
    min_rate: float

    def deadline(self, start: float, last: float, received: int) -> tuple[float, str]:
        """(loop time by which the next bytes must arrive, the limit that would pass then)."""
        options = [(start + self.total_s, "upload_timeout_s"), (last + self.idle_s, "body_idle_s")]
        if self.min_rate > 0:  # received >= min_rate * (t - grace)  <=>  t <= grace + received / min_rate
            options.append((start + self.idle_s + received / self.min_rate, "min_upload_kib_s"))
        return min(options)

    def late(self, limit: str, received: int, seconds: float) -> Exception:
        from fastapi import HTTPException

        detail = {
            "upload_timeout_s": f"body not received within {self.total_s:g} s ({received} bytes arrived)",
            "body_idle_s": f"no body bytes for {self.idle_s:g} s ({received} bytes arrived)",
            "min_upload_kib_s": f"body slower than {self.min_rate / 1024:g} KiB/s ({received} bytes in {seconds:.0f} s)",
        }[limit]
        exc = HTTPException(408, detail)
        exc.limit = limit
        return exc


async def read_body(request, max_bytes: int, pace: Pace, reserve=lambda n: None) -> bytearray:
    """The whole request body within `max_bytes` and `pace`, each arriving chunk charged with `reserve(n)`
    (`BodyBudget.reserve`: n = bytes received so far).

    413 over the limit, 408 when it does not arrive in time (stalled, trickling, or shorter than its
    Content-Length on an open connection), 400 when the client goes away or the length is wrong, 429 or
    503 when the bodies held by this client or by all requests would pass their budget.
    """
    from fastapi import HTTPException
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise refuse(413, "max_upload_mb", f"body of {declared} bytes exceeds the limit of {max_bytes}")
    loop = asyncio.get_running_loop()
    body, start = bytearray(), loop.time()
    last, chunks = start, request.stream().__aiter__()
    while True:
        when, limit = pace.deadline(start, last, len(body))
        try:
            async with asyncio.timeout_at(when):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise pace.late(limit, len(body), loop.time() - start) from None
        except ClientDisconnect:  # nobody is left to answer; no traceback in the log either
            raise HTTPException(400, f"client disconnected after {len(body)} bytes") from None
        if chunk:
            body += chunk
            last = loop.time()
            if len(body) > max_bytes:
                raise refuse(413, "max_upload_mb", f"body exceeds the limit of {max_bytes} bytes")
            reserve(len(body))
    if declared is not None and len(body) != declared:
        raise HTTPException(400, f"body of {len(body)} bytes, Content-Length declared {declared}")
    return body  # not copied into bytes: one body-sized buffer less per request
