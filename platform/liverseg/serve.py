"""REST service for the promoted model (FastAPI).

POST /segment  body: a NIfTI volume (.nii or .nii.gz bytes) -> the liver mask as .nii.gz on its grid
GET  /health   liveness and the loaded version
GET  /model    name, version, alias, since (UTC ISO time the version began answering), metrics, lineage
POST /reload   re-resolve the alias and swap the model in without dropping requests (also on SIGHUP);
               needs `Authorization: Bearer $LIVERSEG_RELOAD_TOKEN`
POST /webhook  MLflow's `model_version_alias.created` delivery, HMAC-signed with $LIVERSEG_WEBHOOK_SECRET:
               for this replica's NAME@ALIAS it wakes the follower, which reloads; polling every
               `serve.poll_s` seconds is the fallback

Bad input is a 4xx with a one-line message; the server stays up.
"""

import asyncio
import hmac
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from liverseg.artifact import LoadedModel, load_model, resolve_version
from liverseg.config import ServeSection
from liverseg.errors import InputError
from liverseg.webhook import SECRET_ENV, Verifier, WebhookRejected

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # a 512x512x1000 int16 volume, uncompressed
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

    def __init__(self, uri: str, device: str = "auto", max_concurrent: int = 2):
        self.uri, self.device = uri, device
        self._reload_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.slots = threading.BoundedSemaphore(max_concurrent)  # bounds memory under load
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


async def read_body(request, max_bytes: int, timeout_s: float) -> bytearray:
    """The whole request body within `max_bytes` and `timeout_s` (for all of it, not per chunk).

    413 over the limit, 408 when it does not arrive in time (a stalled upload, or a body shorter than
    its Content-Length on an open connection), 400 when the client goes away or the length is wrong.
    """
    from fastapi import HTTPException
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {max_bytes}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise HTTPException(413, f"body exceeds the limit of {max_bytes} bytes")
    except TimeoutError:
        raise HTTPException(408, f"body not received within {timeout_s:g} s ({len(body)} bytes arrived)") from None
    except ClientDisconnect:  # nobody is left to answer; no traceback in the log either
        raise HTTPException(400, f"client disconnected after {len(body)} bytes") from None
    if declared and declared.isdigit() and len(body) != int(declared):
        raise HTTPException(400, f"body of {len(body)} bytes, Content-Length declared {declared}")
    return body  # not copied into bytes: one body-sized buffer less per request


def create_app(
    holder: ModelHolder,
    max_bytes: int = DEFAULT_MAX_BYTES,
    reload_token: str | None = None,
    verifier: Verifier | None = None,
    upload_timeout_s: float = ServeSection().upload_timeout_s,
):
    """The FastAPI app; `reload_token` guards POST /reload (None: disabled), `verifier` checks webhooks."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import Response

    from liverseg.inference import mask_nifti_bytes, segment_canonical
    from liverseg.lits import from_canonical, gunzip, read_volume

    app = FastAPI(title="liverseg", version="1")
    _follow_routes(app, holder, reload_token, verifier or Verifier(None, 300.0), upload_timeout_s)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": holder.current.info.get("version")}

    @app.post("/segment")
    async def segment(request: Request) -> Response:
        body = await read_body(request, max_bytes, upload_timeout_s)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_segment_bytes, body)

    def _segment_bytes(body: bytearray) -> Response:
        if not body:
            raise HTTPException(400, "empty body: send a NIfTI volume (.nii or .nii.gz bytes)")
        served = holder.current
        with holder.slots:  # decoding counts against the bound too: it is most of a request's memory
            try:  # every gzip layer together within the upload limit (a nested bomb stays small)
                vol = read_volume("upload.nii", data=gunzip(body, "upload.nii.gz", limit=max_bytes))
            except InputError as e:
                raise HTTPException(400 if "too large" not in str(e) else 413, str(e)) from None
            mask = segment_canonical(served.lm, vol.image)
        out = from_canonical(mask, vol.affine).reshape(vol.shape)
        headers = {
            "X-Model-Version": str(served.info.get("version")),
            "Content-Disposition": "attachment; filename=mask.nii.gz",
        }
        return Response(mask_nifti_bytes(out, vol.header, vol.affine), media_type="application/gzip", headers=headers)

    return app


def _follow_routes(
    app, holder: ModelHolder, reload_token: str | None, verifier: Verifier, body_timeout_s: float
) -> None:
    """GET /model, POST /reload (bearer token), POST /webhook (MLflow-signed alias events)."""
    from fastapi import HTTPException, Request

    @app.get("/model")
    def model() -> dict[str, Any]:
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
        body = await read_body(request, WEBHOOK_MAX_BYTES, body_timeout_s)  # a whole-body deadline, as for uploads
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
    app = create_app(holder, max_bytes, os.environ.get(RELOAD_TOKEN_ENV) or None, verifier, cfg.upload_timeout_s)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=holder.reload, daemon=True).start())
    holder.follow(cfg.poll_s)
    info = holder.current.info
    print(f"serving {info.get('name', uri)} v{info.get('version', '?')} on http://{host}:{port}", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        holder.stop()
