"""REST service for the promoted model (FastAPI).

POST /segment  body: a NIfTI volume (.nii or .nii.gz bytes) -> the liver mask as .nii.gz on its grid
GET  /health   liveness and the loaded version
GET  /model    name, version, alias, metrics, lineage
POST /reload   re-resolve the alias and swap the model in without dropping requests (also on SIGHUP)

Bad input is a 4xx with a one-line message; the server stays up.
"""

import asyncio
import signal
import threading
from dataclasses import dataclass
from typing import Any

from liverseg.lits import InputError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # a 512x512x1000 int16 volume, uncompressed
DEFAULT_UPLOAD_TIMEOUT_S = 120.0  # a 512 MiB body at ~5 MB/s; a stalled or short body ends in 408 after this


@dataclass
class Served:
    lm: Any
    info: dict[str, Any]


def load_served(uri: str, device: str = "auto") -> Served:
    """Load a model and describe it; for models:/ URIs the registry version, tags and lineage."""
    from mlflow.tracking import MlflowClient

    from liverseg.evaluate import load_model
    from liverseg.tracking import tracking_uri

    info: dict[str, Any] = {"uri": uri}
    if uri.startswith("models:/"):
        from liverseg.registry import resolve_version

        client = MlflowClient(tracking_uri())
        mv = resolve_version(client, uri)
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
        uri = f"models:/{mv.name}/{mv.version}"  # pin: the alias may move while we load
    lm = load_model(uri, device)
    info["preprocessing"] = {k: lm.meta[k] for k in ("window", "size", "mean", "std", "in_channels", "orientation")}
    return Served(lm, info)


class ModelHolder:
    """The current model; `reload` builds the new one first, then swaps the reference atomically."""

    def __init__(self, uri: str, device: str = "auto", max_concurrent: int = 2):
        self.uri, self.device = uri, device
        self.current = load_served(uri, device)
        self._reload_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_concurrent)  # bounds memory under load

    def reload(self) -> dict[str, Any]:
        with self._reload_lock:
            new = load_served(self.uri, self.device)
            old = self.current.info.get("version")
            self.current = new  # in-flight requests keep the object they started with
            return {"previous_version": old, "version": new.info.get("version")}


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
    holder: ModelHolder, max_bytes: int = DEFAULT_MAX_BYTES, upload_timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S
):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import Response

    from liverseg.inference import mask_nifti_bytes, segment_canonical
    from liverseg.lits import from_canonical, gunzip, read_volume

    app = FastAPI(title="liverseg", version="1")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": holder.current.info.get("version")}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return holder.current.info

    @app.post("/reload")
    def reload() -> dict[str, Any]:
        try:
            return holder.reload()
        except Exception as e:
            raise HTTPException(
                503, f"reload failed, still serving v{holder.current.info.get('version')}: {e}"
            ) from None

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


def serve(
    uri: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
    upload_timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S,
) -> None:
    """Run the service until interrupted; SIGHUP reloads the alias."""
    import uvicorn

    holder = ModelHolder(uri, device)
    app = create_app(holder, max_bytes, upload_timeout_s)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=holder.reload, daemon=True).start())
    info = holder.current.info
    print(f"serving {info.get('name', uri)} v{info.get('version', '?')} on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
