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

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import hmac
import time
from typing import Any

from liverseg.core import env
from liverseg.core.config import ServeSection
from liverseg.core.errors import InputError, TooLarge
from liverseg.core.limits import MAX_UPLOAD_BYTES, WEBHOOK_MAX_BYTES
from liverseg.serving.backpressure import BodyBudget, Slots, read_body
from liverseg.serving.holder import ModelHolder, Served
from liverseg.serving.webhook import Verifier, WebhookRejected

MODEL_SLOTS = 2  # requests decoding and segmenting at once: most of a request's memory is spent there


def create_app(
    holder: ModelHolder,
    max_bytes: int = MAX_UPLOAD_BYTES,
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
        return {"status": "ok", "version": holder.current.info.version}

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

    from liverseg.data.lits import check_slices, from_canonical, gunzip, read_volume
    from liverseg.model.inference import mask_nifti_bytes, segment_canonical

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
        "X-Model-Version": str(served.info.version),
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
        return {**holder.current.info.to_json(), "follow_error": holder.last_error}

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
            raise HTTPException(503, f"reload failed, still serving v{holder.current.info.version}: {e}") from None

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
