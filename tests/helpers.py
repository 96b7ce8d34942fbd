"""Real (untrained) models with known behaviour, logged and registered through the project's own code."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

SMALL_MODEL = {"encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]}


def constant_state(liver: bool) -> dict[str, torch.Tensor]:
    """A U-Net whose head ignores its input: every voxel liver (True) or none (False)."""
    from liverseg.model import build_model

    net = build_model(SMALL_MODEL["encoder"], "none", 1, SMALL_MODEL["decoder_channels"])
    head = net.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 10.0] if liver else [10.0, 0.0]))
    return net.state_dict()


def spec(size=(64, 64), in_channels: int = 1):
    """The spec of the small test U-Net."""
    from liverseg.artifact import ModelSpec

    return ModelSpec(
        encoder=SMALL_MODEL["encoder"],
        decoder_channels=tuple(SMALL_MODEL["decoder_channels"]),
        in_channels=in_channels,
        window=(-200.0, 250.0),
        mean=0.2,
        std=0.3,
        size=tuple(size),
    )


def log_model_run(
    state: dict, experiment: str = "liverseg", val_dice: float = 0.5, store_path: str = ""
) -> tuple[str, str]:
    """One finished MLflow run holding the model as the pyfunc training logs; returns (run id, model uri)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from liverseg.artifact import log_model, save_local
    from liverseg.tracking import experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    run = client.create_run(
        experiment_id(client, experiment),
        tags={
            "git_commit": "abc123",
            "dvc_store_md5": "d41d8cd9",
            "store_path": store_path,
            "store_digest": "f" * 64,
            "config_hash": "cafe",
        },
    )
    rid = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=rid):
        save_local(Path(tmp) / "m", state, spec())
        info = log_model(Path(tmp) / "m")
    client.set_tag(rid, "model_uri", info.model_uri)
    client.set_tag(rid, "best_val_dice", str(val_dice))
    client.set_terminated(rid, "FINISHED")
    return rid, info.model_uri


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, log: Path | None = None, timeout_s: float = 120) -> None:
    """Until GET url answers 200; fails with the process's log if it exits or the time runs out."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{url} did not come up: {log.read_text()[-2000:] if log else ''}")


def start_mlflow_server(root: Path, env: dict[str, str] | None = None):
    """`mlflow server` on SQLite + a local artifact folder under root, 127.0.0.1; returns (proc, uri).
    The caller stops it (terminate, wait)."""
    import os
    import subprocess
    import sys

    port = free_port()
    log = root / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'srv.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, "--workers", "1"], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    uri = f"http://127.0.0.1:{port}"
    wait_http(uri + "/health", proc, log, 120)
    return proc, uri


def start_serve(root: Path, model: str, env: dict[str, str], *args: str, preexec_fn=None):
    """A `liverseg serve` process on a free port; returns (proc, base URL) once /health answers.

    preexec_fn: run in the child before it starts (e.g. to lower its open-files limit)."""
    import os
    import subprocess
    import sys

    port = free_port()
    log = root / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "liverseg.cli", "serve", "--model", model, "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LIVERSEG_LOCK_DIR": str(root), **env},
            preexec_fn=preexec_fn,
        )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc, log, 120)
    return proc, base


def stop(proc, timeout_s: float = 30) -> None:
    """Terminate a process we started, by its PID; kill it if it does not exit."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nifti2_declaring(dims: tuple[int, int, int], data: bytes = bytes(64)) -> bytes:
    """A NIfTI-2 file whose header declares `dims` (uint8) over `data` (which may be far fewer bytes)."""
    import io

    import nibabel as nib
    import numpy as np

    raw = nib.Nifti2Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).to_bytes()
    hdr = nib.Nifti2Header.from_fileobj(io.BytesIO(raw))
    hdr["dim"][1:4] = dims
    block = hdr.binaryblock
    return block + raw[len(block) : int(hdr["vox_offset"])] + data
