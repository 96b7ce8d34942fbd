"""REST service for the promoted model (FastAPI).

POST /segment  body: a NIfTI volume (.nii or .nii.gz bytes) -> the liver mask as .nii.gz on its grid
GET  /health   liveness and the loaded version
GET  /model    name, version, alias, metrics, lineage
POST /reload   re-resolve the alias and swap the model in without dropping requests (also on SIGHUP)

Bad input is a 4xx with a one-line message; the server stays up.
"""

import signal
import threading
from dataclasses import dataclass
from typing import Any

from liverseg.artifact import LoadedModel, load_model
from liverseg.errors import InputError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # a 512x512x1000 int16 volume, uncompressed


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


def create_app(holder: ModelHolder, max_bytes: int = DEFAULT_MAX_BYTES):
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
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {max_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise HTTPException(413, f"body exceeds the limit of {max_bytes} bytes")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_segment_bytes, bytes(body))

    def _segment_bytes(body: bytes) -> Response:
        if not body:
            raise HTTPException(400, "empty body: send a NIfTI volume (.nii or .nii.gz bytes)")
        try:
            body = gunzip(body, "upload.nii.gz", limit=4 * max_bytes)
            vol = read_volume("upload.nii", data=body)
        except InputError as e:
            raise HTTPException(400 if "too large" not in str(e) else 413, str(e)) from None
        served = holder.current
        with holder.slots:
            mask = segment_canonical(served.lm, vol.image)
        out = from_canonical(mask, vol.affine).reshape(vol.shape)
        headers = {
            "X-Model-Version": str(served.info.get("version")),
            "Content-Disposition": "attachment; filename=mask.nii.gz",
        }
        return Response(mask_nifti_bytes(out, vol.header, vol.affine), media_type="application/gzip", headers=headers)

    return app


def serve(
    uri: str, host: str = "127.0.0.1", port: int = 8080, device: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES
) -> None:
    """Run the service until interrupted; SIGHUP reloads the alias."""
    import uvicorn

    holder = ModelHolder(uri, device)
    app = create_app(holder, max_bytes)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=holder.reload, daemon=True).start())
    info = holder.current.info
    print(f"serving {info.get('name', uri)} v{info.get('version', '?')} on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
