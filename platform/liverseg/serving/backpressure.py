"""Back-pressure: what a busy replica refuses rather than queue without bound. Request bodies are read
within a size and a deadline and counted against one budget over all requests; the model slots are
awaited on the event loop by a bounded queue for a bounded time. Past any of them: 413, 408 or 503
with Retry-After."""

# No `from __future__ import annotations`: FastAPI may read annotations at runtime.
import asyncio
import contextlib

RETRY_AFTER_S = 10  # a busy server's hint to clients: about one segmentation of a small volume on CPU


def busy(detail: str) -> Exception:
    """A 503 with Retry-After: the server sheds load rather than queueing without bound."""
    from fastapi import HTTPException

    return HTTPException(503, detail, {"Retry-After": str(RETRY_AFTER_S)})


class BodyBudget:
    """Bytes of request bodies buffered at once over all requests; used on the event loop only (no lock).

    A request reserves its Content-Length before reading (or its bytes as they come, without one) and
    gives them back when answered: slow or stalled uploads cannot hold more than `limit` bytes together.
    """

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @contextlib.contextmanager
    def reserve(self):
        """Yields `upto(n)`: make sure n bytes are reserved for this request (503 past the limit)."""
        held = 0

        def upto(n: int) -> None:
            nonlocal held
            if n > held:
                if self.used + n - held > self.limit:
                    raise busy(f"busy: {self.used} bytes of uploads buffered (limit {self.limit}); retry later")
                self.used, held = self.used + n - held, n

        try:
            yield upto
        finally:
            self.used -= held


class Slots:
    """The model slots, awaited on the event loop (no thread waits), by at most `max_queued` requests at
    a time and for at most `timeout_s` each; past either a 503."""

    def __init__(self, n: int, max_queued: int, timeout_s: float):
        self._sem = asyncio.Semaphore(n)
        self.max_queued, self.timeout_s, self.waiting = max_queued, timeout_s, 0

    @contextlib.asynccontextmanager
    async def hold(self):
        if self._sem.locked() and self.waiting >= self.max_queued:
            raise busy(f"busy: {self.waiting} requests already wait for a model slot; retry later")
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._sem.acquire()
        except TimeoutError:
            raise busy(f"busy: no model slot free within {self.timeout_s:g} s; retry later") from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._sem.release()


async def read_body(request, max_bytes: int, timeout_s: float, reserve=lambda n: None) -> bytearray:
    """The whole request body within `max_bytes` and `timeout_s` (for all of it, not per chunk), its
    bytes reserved first with `reserve(n)` (`BodyBudget.reserve`).

    413 over the limit, 408 when it does not arrive in time (a stalled upload, or a body shorter than
    its Content-Length on an open connection), 400 when the client goes away or the length is wrong,
    503 when the buffered bodies of all requests together would pass their budget.
    """
    from fastapi import HTTPException
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {max_bytes}")
    reserve(declared or 0)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise HTTPException(413, f"body exceeds the limit of {max_bytes} bytes")
                reserve(len(body))  # without a Content-Length, as it comes
    except TimeoutError:
        raise HTTPException(408, f"body not received within {timeout_s:g} s ({len(body)} bytes arrived)") from None
    except ClientDisconnect:  # nobody is left to answer; no traceback in the log either
        raise HTTPException(400, f"client disconnected after {len(body)} bytes") from None
    if declared is not None and len(body) != declared:
        raise HTTPException(400, f"body of {len(body)} bytes, Content-Length declared {declared}")
    return body  # not copied into bytes: one body-sized buffer less per request
