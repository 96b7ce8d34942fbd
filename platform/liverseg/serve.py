"""REST service for the promoted model (FastAPI).

POST /segment  body: a NIfTI volume (.nii or .nii.gz bytes) -> the liver mask as .nii.gz on its grid
GET  /health   liveness and the loaded version
GET  /model    name, version, alias, since (UTC ISO time the version began answering), metrics, lineage
POST /reload   re-resolve the alias and swap the model in without dropping requests (also on SIGHUP);
               needs `Authorization: Bearer $LIVERSEG_RELOAD_TOKEN`
POST /webhook  MLflow's `model_version_alias.created` delivery, HMAC-signed with $LIVERSEG_WEBHOOK_SECRET:
               for this replica's NAME@ALIAS it wakes the follower, which reloads; polling every
               `serve.poll_s` seconds is the fallback

Bad input is a 4xx with a one-line message; the server stays up. A busy one sheds load with 503 and
Retry-After (buffered bodies, model-slot queue, connections: `serve.*` keys) rather than queue without bound.
"""

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from liverseg.artifact import LoadedModel, load_model, resolve_version
from liverseg.config import ServeSection
from liverseg.errors import InputError, TooLarge
from liverseg.webhook import SECRET_ENV, Verifier, WebhookRejected

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # a 512x512x1000 int16 volume, uncompressed
MODEL_SLOTS = 2  # requests decoding and segmenting at once: most of a request's memory is spent there
RETRY_AFTER_S = 10  # a busy server's hint to clients: about one segmentation of a small volume on CPU
WEBHOOK_MAX_BYTES = 64 * 1024  # MLflow's alias payload is ~200 bytes
RELOAD_TOKEN_ENV = "LIVERSEG_RELOAD_TOKEN"


@dataclass
class Served:
    lm: LoadedModel
    info: dict[str, Any]


def load_served(uri: str, device: str = "auto") -> Served:
    """Load a model (weights and spec only, see `artifact.load_model`) and describe it; for models:/
    URIs the registry version, tags and lineage."""
    lm = load_model(uri, device)
    info: dict[str, Any] = {"uri": uri}
    mv = lm.version
    if mv is not None:
        ref = uri[len("models:/") :]
        info.update(
            name=mv.name,
            version=str(mv.version),
            alias=ref.split("@", 1)[1] if "@" in ref else None,
            metrics={k: mv.tags[k] for k in ("test_dice", "val_dice", "champion_test_dice") if k in mv.tags},
            lineage={
                k: mv.tags[k]
                for k in ("training_run_id", "git_commit", "dvc_store_md5", "store_digest", "config_hash")
                if k in mv.tags
            },
        )
    s = lm.spec
    info["preprocessing"] = {
        "window": list(s.window),
        "size": list(s.size),
        "mean": s.mean,
        "std": s.std,
        "in_channels": s.in_channels,
        "orientation": s.orientation,
    }
    return Served(lm, info)


class ModelHolder:
    """The current model; `reload` builds the new one first, then swaps the reference atomically.

    In-flight requests keep the `Served` object they started with, so a swap drops none. For a
    `models:/NAME@ALIAS` URI a follower thread re-resolves the alias every `poll_s` seconds (0: never)
    and whenever `wake` is called (the webhook), and reloads when the alias points elsewhere.
    """

    def __init__(self, uri: str, device: str = "auto"):
        self.uri, self.device = uri, device
        self._reload_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.current = self._stamped(load_served(uri, device))
        self.last_error: str | None = None

    @staticmethod
    def _stamped(served: Served) -> Served:
        served.info["since"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        return served

    def serves(self, name: str, alias: str) -> bool:
        """Whether an alias event for (name, alias) concerns this replica's model URI."""
        return self.current.info.get("name") == name and self.current.info.get("alias") == alias

    def reload(self) -> dict[str, Any]:
        with self._reload_lock:
            new = load_served(self.uri, self.device)
            old = self.current.info.get("version")
            self.current = self._stamped(new)  # in-flight requests keep the object they started with
            return {"previous_version": old, "version": new.info.get("version")}

    def reload_if_moved(self) -> bool:
        """Re-resolve the alias (one registry call); reload only if it names another version."""
        from liverseg.tracking import client

        if self.current.info.get("alias") is None:
            return False  # a pinned version or a run: nothing to follow
        mv = resolve_version(client(), self.uri)
        if str(mv.version) == self.current.info.get("version"):
            return False
        self.reload()
        return True

    def wake(self) -> None:
        self._wake.set()

    def follow(self, poll_s: float) -> threading.Thread:
        """Start the follower thread (daemon); `stop` ends it."""
        thread = threading.Thread(target=self._follow, args=(poll_s,), name="alias-follower", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _follow(self, poll_s: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(poll_s or None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.reload_if_moved():
                    print(f"now serving v{self.current.info.get('version')} of {self.uri}", flush=True)
                self.last_error = None
            except Exception as e:  # the registry may be down for a while: keep serving, retry next time
                self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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


def create_app(
    holder: ModelHolder,
    max_bytes: int = DEFAULT_MAX_BYTES,
    reload_token: str | None = None,
    verifier: Verifier | None = None,
    cfg: ServeSection | None = None,
):
    """The FastAPI app; `reload_token` guards POST /reload (None: disabled), `verifier` checks webhooks.

    Cheap routes are `async def`: they answer on the event loop, never behind requests in the thread pool.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    cfg = cfg or ServeSection()
    budget = BodyBudget(cfg.max_bodies * max_bytes)
    slots = Slots(MODEL_SLOTS, cfg.max_queued, cfg.queue_timeout_s)
    app = FastAPI(title="liverseg", version="1")
    _follow_routes(app, holder, reload_token, verifier or Verifier(None, 300.0), cfg.upload_timeout_s, budget)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": holder.current.info.get("version")}

    @app.post("/segment")
    async def segment(request: Request) -> Response:
        with budget.reserve() as reserve:
            body = await read_body(request, max_bytes, cfg.upload_timeout_s, reserve)
            async with slots.hold():  # decoding counts too: with segmenting, most of a request's memory
                # a thread, not the loop; not abandoned when the client leaves, so the slot stays held
                return await run_in_threadpool(_segment_bytes, holder.current, body, max_bytes, cfg.max_slices)

    return app


def _segment_bytes(served: Served, body: bytearray, max_bytes: int, max_slices: int):
    """Decode an upload (every gzip layer together within `max_bytes`), segment it, answer the mask."""
    from fastapi import HTTPException
    from fastapi.responses import Response

    from liverseg.inference import mask_nifti_bytes, segment_canonical
    from liverseg.lits import check_slices, from_canonical, gunzip, read_volume

    if not body:
        raise HTTPException(400, "empty body: send a NIfTI volume (.nii or .nii.gz bytes)")
    try:
        vol = read_volume("upload.nii", data=gunzip(body, "upload.nii.gz", limit=max_bytes))
        check_slices(vol.image, "upload.nii", max_slices)
    except InputError as e:
        raise HTTPException(413 if isinstance(e, TooLarge) else 400, str(e)) from None
    mask = segment_canonical(served.lm, vol.image)
    out = from_canonical(mask, vol.affine).reshape(vol.shape)
    headers = {
        "X-Model-Version": str(served.info.get("version")),
        "Content-Disposition": "attachment; filename=mask.nii.gz",
    }
    return Response(mask_nifti_bytes(out, vol.header, vol.affine), media_type="application/gzip", headers=headers)


def _follow_routes(
    app, holder: ModelHolder, reload_token: str | None, verifier: Verifier, body_timeout_s: float, budget: BodyBudget
) -> None:
    """GET /model, POST /reload (bearer token), POST /webhook (MLflow-signed alias events)."""
    from fastapi import HTTPException, Request

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return {**holder.current.info, "follow_error": holder.last_error}

    @app.post("/reload")
    def reload(request: Request) -> dict[str, Any]:
        if not reload_token:
            raise HTTPException(403, f"reload disabled: {RELOAD_TOKEN_ENV} is not set on this replica")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), reload_token.encode()):
            raise HTTPException(
                401, "POST /reload needs 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
            )
        try:
            return holder.reload()
        except Exception as e:
            raise HTTPException(
                503, f"reload failed, still serving v{holder.current.info.get('version')}: {e}"
            ) from None

    @app.post("/webhook", status_code=202)
    async def webhook(request: Request) -> dict[str, Any]:
        with budget.reserve() as reserve:  # a whole-body deadline and the shared budget, as for uploads
            body = await read_body(request, WEBHOOK_MAX_BYTES, body_timeout_s, reserve)
        try:
            event = verifier.verify(dict(request.headers), bytes(body), time.time())
        except WebhookRejected as e:
            raise HTTPException(e.status, str(e)) from None
        if event is None:
            return {"action": "ignored", "reason": "not a model_version_alias.created event"}
        if not holder.serves(event.name, event.alias):
            return {"action": "ignored", "reason": f"this replica serves {holder.uri}, not {event.name}@{event.alias}"}
        holder.wake()  # the follower re-resolves the alias and swaps; MLflow's sender does not wait for the load
        return {"action": "reloading", "version": event.version}


def serve(
    uri: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
    cfg: ServeSection | None = None,
) -> None:
    """Run the service until interrupted; follows the alias (webhook + polling), SIGHUP reloads.

    Secrets come from the environment: LIVERSEG_RELOAD_TOKEN (bearer token of POST /reload) and
    LIVERSEG_WEBHOOK_SECRET (the MLflow webhook's HMAC secret); without them those routes refuse.
    """
    import uvicorn

    cfg = cfg or ServeSection()
    holder = ModelHolder(uri, device)
    verifier = Verifier(os.environ.get(SECRET_ENV) or None, cfg.webhook_max_age_s)
    app = create_app(holder, max_bytes, os.environ.get(RELOAD_TOKEN_ENV) or None, verifier, cfg)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=holder.reload, daemon=True).start())
    holder.follow(cfg.poll_s)
    info = holder.current.info
    files = _raise_open_files_limit()
    if files < cfg.max_connections + 64:  # the model, logs and sockets of its own need some too
        print(f"warning: {files} open files allowed, serve.max_connections={cfg.max_connections}", flush=True)
    print(f"serving {info.get('name', uri)} v{info.get('version', '?')} on http://{host}:{port}", flush=True)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        loop="asyncio",
        http=_header_deadline_protocol(cfg.header_timeout_s),
        limit_concurrency=cfg.max_connections,
    )
    quiet = OncePerMinute()
    logging.getLogger("uvicorn.error").addFilter(quiet)  # uvicorn's logger for refused and invalid requests
    try:
        asyncio.run(_serve_quietly(uvicorn.Server(config), quiet))
    finally:
        holder.stop()


def _raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one (each connection is one); returns the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):  # an unlimited hard limit is above the kernel's nr_open
        return soft


class OncePerMinute(logging.Filter):
    """Lets each distinct warning through at most once a minute, with how often it came meanwhile.

    Under attack, uvicorn warns for every refused request (`Exceeded concurrency limit.`) and asyncio for
    every connection waiting on a process out of file descriptors: a million lines in a minute.
    """

    def __init__(self):
        super().__init__()
        self.said: dict[str, tuple[float, int]] = {}  # message -> (when last said, times since)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if len(self.said) > 1000:  # messages that vary (addresses): forget rather than grow
            self.said.clear()
        when, times = self.said.get(text, (-60.0, 0))
        if time.monotonic() - when < 60:
            self.said[text] = (when, times + 1)
            return False
        self.said[text] = (time.monotonic(), 0)
        if times:
            record.msg, record.args = f"{text} ({times} more in the last minute)", ()
        return True


async def _serve_quietly(server, quiet: OncePerMinute) -> None:
    """`server.serve()` with asyncio's accept errors (one per waiting connection and retry when out of
    file descriptors) reported through `quiet`."""

    def handle(loop, context) -> None:
        if not context.get("message", "").startswith("socket.accept() out of system resource"):
            return loop.default_exception_handler(context)
        record = logging.LogRecord("liverseg.serve", logging.WARNING, "", 0, "", (), None)
        record.msg = f"cannot accept connections: {context.get('exception')}"
        if quiet.filter(record):
            print(f"warning: {record.getMessage()}", flush=True)

    asyncio.get_running_loop().set_exception_handler(handle)
    await server.serve()


def _header_deadline_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request's headers within
    `timeout_s` of opening or of its last answer. uvicorn times only idle keep-alive connections, and
    any byte resets that: a client trickling a request line held its socket for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(timeout_s, self._headers_late)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._headers_late)

        def connection_lost(self, exc) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request under way: its headers are late
                self.transport.close()

    return HeaderDeadline
