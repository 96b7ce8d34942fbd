"""REST service for the promoted model (FastAPI).

POST /segment  body: a NIfTI volume (.nii or .nii.gz bytes) -> the liver mask as .nii.gz on its grid,
               answered by the champion (`X-Model-Version`); a shadow, if any, segments a copy afterwards
GET  /health   "ok", or "degraded" with the reason while the alias names a version that cannot be loaded
GET  /model    name, version, alias, since (UTC ISO time the version began answering), metrics, lineage,
               follow status; the shadow's model, queue and agreement
GET  /metrics  Prometheus text format (`serving.metrics`)
POST /reload   re-resolve the alias and swap the model in without dropping requests (also on SIGHUP);
               needs `Authorization: Bearer $LIVERSEG_RELOAD_TOKEN`
POST /webhook  MLflow's `model_version_alias.created` delivery, HMAC-signed with $LIVERSEG_WEBHOOK_SECRET:
               for this replica's NAME@ALIAS (or its shadow's) it wakes the follower, which reloads;
               polling every `serve.poll_s` seconds is the fallback

Bad input is a 4xx with a one-line message; the server stays up. A busy one sheds load (413, 408, 429,
503 with Retry-After: `serve.*` keys, named in the answer) rather than queue without bound. Every
answer carries `X-Request-Id`; each request is one JSON line in the access log (`serving.access`).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import hmac
import time
from typing import TYPE_CHECKING, Any

from liverseg.core import env
from liverseg.core.config import ServeSection
from liverseg.core.errors import InputError, TooLarge
from liverseg.core.limits import WEBHOOK_MAX_BYTES, VolumeLimits
from liverseg.serving.access import Access
from liverseg.serving.backpressure import BodyBudget, Pace, Slots, read_body, refuse
from liverseg.serving.holder import ModelHolder, Served
from liverseg.serving.metrics import Metrics
from liverseg.serving.webhook import Verifier, WebhookRejected

if TYPE_CHECKING:
    from liverseg.serving.shadow import Shadow

MODEL_SLOTS = 2  # requests decoding and segmenting at once: most of a request's memory is spent there


def create_app(
    holder: ModelHolder,
    cfg: ServeSection | None = None,
    reload_token: str | None = None,
    verifier: Verifier | None = None,
    metrics: Metrics | None = None,
    shadow: "Shadow | None" = None,
):
    """The ASGI app; `reload_token` guards POST /reload (None: disabled), `verifier` checks webhooks,
    `shadow` (serving.shadow.Shadow) gets a copy of every answered request.

    Cheap routes are `async def`: they answer on the event loop, never behind requests in the thread pool.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    cfg, metrics = cfg or ServeSection(), metrics or Metrics()
    max_bytes = cfg.max_upload_mb << 20
    per_client = cfg.max_client_bodies * max_bytes
    budget = BodyBudget(cfg.max_bodies * max_bytes, per_client, cfg.max_client_uploads, metrics.buffered.set)
    slots = Slots(MODEL_SLOTS, cfg.max_queued, cfg.queue_timeout_s, metrics.slots)
    pace = Pace(cfg.upload_timeout_s, cfg.body_idle_s, cfg.min_upload_kib_s * 1024)
    limits = cfg.volume_limits()
    if shadow is not None:
        shadow.idle = slots.idle  # it segments only while no request holds or awaits a slot
    app = FastAPI(title="liverseg", version="1")
    _status_routes(app, holder, metrics)
    _follow_routes(app, holder, shadow, reload_token, verifier or Verifier(None, 300.0), (pace, budget))

    @app.post("/segment")
    async def segment(request: Request) -> Response:
        client = request.client.host if request.client else ""
        with budget.reserve(client) as reserve:
            body = await read_body(request, max_bytes, pace, reserve)
            async with slots.hold():  # decoding counts too: with segmenting, most of a request's memory
                served = holder.current
                request.state.model_version = served.info.version
                # a thread, not the loop; not abandoned when the client leaves, so the slot stays held
                response, voxels, outcome = await run_in_threadpool(_segment_bytes, served, body, limits, shadow)
                request.state.shadow = outcome
                metrics.voxels.inc(voxels)
                return response

    return Access(app, metrics, cfg.access_log)


def _status_routes(app, holder: ModelHolder, metrics: Metrics) -> None:
    """GET /health, GET /metrics, and refusals named for the access log and `liverseg_refusals_total`."""
    from fastapi import Request
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def named_refusal(request: Request, exc: HTTPException):
        request.state.limit = getattr(exc, "limit", None)
        return await http_exception_handler(request, exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        status, reason = holder.status()
        return {"status": status, "version": holder.version} | ({"reason": reason} if reason else {})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _segment_bytes(served: Served, body: bytearray, limits: VolumeLimits, shadow: "Shadow | None"):
    """Decode an upload within `limits` (its header checked before any voxel is decoded), segment it,
    offer it to the shadow; (the mask as a response, voxels segmented, the shadow's outcome or None)."""
    from fastapi import HTTPException
    from fastapi.responses import Response

    from liverseg.data.lits import from_canonical, read_volume
    from liverseg.model.inference import mask_nifti_bytes, segment_canonical

    if not body:
        raise HTTPException(400, "empty body: send a NIfTI volume (.nii or .nii.gz bytes)")
    try:
        vol = read_volume("upload.nii", data=body, limits=limits)
    except TooLarge as e:
        raise refuse(413, e.limit, str(e)) from None
    except InputError as e:
        raise HTTPException(400, str(e)) from None
    mask = segment_canonical(served.lm, vol.image)
    out = from_canonical(mask, vol.affine).reshape(vol.shape)
    headers = {
        "X-Model-Version": str(served.info.version),
        "Content-Disposition": "attachment; filename=mask.nii.gz",
    }
    answer = Response(mask_nifti_bytes(out, vol.header, vol.affine), media_type="application/gzip", headers=headers)
    voxel_ml = float(abs(vol.spacing[0] * vol.spacing[1] * vol.spacing[2])) / 1000.0
    outcome = shadow.offer(vol.image, mask, voxel_ml, str(served.info.version)) if shadow is not None else None
    return answer, int(vol.image.size), outcome


def _follow_routes(
    app, holder: ModelHolder, shadow: "Shadow | None", reload_token: str | None, verifier: Verifier, body
) -> None:
    """GET /model, POST /reload (bearer token), POST /webhook (MLflow-signed alias events); `body`: the
    (Pace, BodyBudget) that webhook bodies are read within, as uploads are."""
    from fastapi import HTTPException, Request

    pace, budget = body

    @app.get("/model")
    async def model() -> dict[str, Any]:
        status, reason = holder.status()
        info = holder.current.info.to_json()
        extra = {"status": status, "follow_error": reason, "shadow": shadow.describe() if shadow else None}
        return info | extra

    @app.post("/reload")
    def reload(request: Request) -> dict[str, Any]:
        if not reload_token:
            raise HTTPException(403, f"reload disabled: {env.RELOAD_TOKEN} is not set on this replica")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), reload_token.encode()):
            raise HTTPException(
                401, "POST /reload needs 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
            )
        try:
            return holder.reload()
        except Exception as e:
            raise HTTPException(503, f"reload failed, still serving v{holder.version}: {e}") from None

    @app.post("/webhook", status_code=202)
    async def webhook(request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else ""
        with budget.reserve(client) as reserve:  # the same pace and budget as uploads
            raw = await read_body(request, WEBHOOK_MAX_BYTES, pace, reserve)
        try:
            event = verifier.verify(dict(request.headers), bytes(raw), time.time())
        except WebhookRejected as e:
            raise HTTPException(e.status, str(e)) from None
        if event is None:
            return {"action": "ignored", "reason": "not a model_version_alias.created event"}
        woken = [h for h in (holder, shadow.holder if shadow else None) if h and h.serves(event.name, event.alias)]
        if not woken:
            return {"action": "ignored", "reason": f"this replica serves {holder.uri}, not {event.name}@{event.alias}"}
        for h in woken:
            h.wake()  # the follower re-resolves the alias and swaps; MLflow's sender does not wait for the load
        return {"action": "reloading", "version": event.version, "role": [h.role for h in woken]}
