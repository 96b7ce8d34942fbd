"""Per request, around the whole app: a request id (a sane `X-Request-Id` from the client, else a new
one) echoed in the answer, the request's metrics, and one JSON access-log line.

The line holds when, who (the client address), what (route, status, seconds, bytes in and out), which
model version answered, what became of the shadow copy and which limit refused it, if one did; never
a header, a query string, a body or a credential. An ASGI middleware (not Starlette's
BaseHTTPMiddleware, which buffers), so a streamed upload is counted as it arrives.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from typing import Any

from liverseg.core.clock import utc_now

REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")  # what a client may name its request: no spaces, no JSON
ROUTES = frozenset({"/segment", "/health", "/model", "/reload", "/webhook", "/metrics"})  # bounded labels


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is one token of at most 128 characters, else a new random one."""
    given = next((v for k, v in headers if k.lower() == b"x-request-id"), b"")
    return given.decode() if REQUEST_ID.match(given) else uuid.uuid4().hex


class Access:
    """ASGI middleware: request id, `metrics.request(...)`, and the access log (`log`: False, or a file)."""

    def __init__(self, app: Any, metrics: Any, log: bool = True, out: Any = None):
        self.app, self.metrics, self.log, self.out = app, metrics, log, out

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rid = request_id(scope.get("headers", []))
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        seen = {"status": 500, "in": 0, "out": 0}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
            return message

        async def tagged_send(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, tagged_send)
        finally:
            self._record(scope, state, seen, time.perf_counter() - t0)

    def _record(self, scope: dict, state: dict, seen: dict, seconds: float) -> None:
        route = scope.get("path", "") if scope.get("path", "") in ROUTES else "other"
        self.metrics.request(route, seen["status"], seconds, seen["in"], seen["out"], state.get("limit"))
        if not self.log:
            return
        client = scope.get("client") or ("", 0)
        line = {
            "time": utc_now(),
            "request_id": state["request_id"],
            "client": client[0],
            "method": scope.get("method", ""),
            "route": route,
            "status": seen["status"],
            "seconds": round(seconds, 4),
            "bytes_in": seen["in"],
            "bytes_out": seen["out"],
            "model_version": state.get("model_version"),
            "shadow": state.get("shadow"),
            "limit": state.get("limit"),
        }
        out = self.out or sys.stdout
        out.write(json.dumps(line, separators=(",", ":")) + "\n")
        out.flush()
