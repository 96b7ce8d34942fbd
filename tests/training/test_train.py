"""End-to-end training on Ray Train (CPU), tracked in MLflow: phantoms -> ingest -> train."""

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from liverseg.core.config import IngestConfig, TrainConfig
from liverseg.core.loading import load_config
from liverseg.data.store import SliceStore
from liverseg.training.train import train
from support.models import TINY


def _cfg(tmp_path, *extra):
    return load_config(TrainConfig, None, [*TINY, f"run.storage_path={tmp_path / 'ray'}", *extra])


def _chance_dice(store_path):
    """Dice of predicting liver everywhere on the validation cases (the 'no skill' baseline)."""
    st = SliceStore(store_path)
    scores = []
    for c in st.cases_in("val"):
        m = st.volume(c)[1] >= 1
        scores.append(2 * m.sum() / (m.sum() + m.size))
    return float(np.mean(scores))


def _check_logged_model(res, phantom_dir, tmp_path) -> None:
    """The trained 3-channel model loads through its spec and segments a phantom on its own grid."""
    from liverseg.model.inference import predict_file
    from liverseg.tracking.models import load_model

    lm = load_model(res.model_uri, "cpu")
    spec = lm.spec
    assert spec.window == (-200.0, 250.0) and spec.size == (64, 64) and 0 < spec.std < 1 and spec.in_channels == 3
    assert spec.train_run_id == res.run_id and spec.best_epoch == res.best_epoch
    predict_file(lm, phantom_dir / "volume-0.nii.gz", tmp_path / "mask.nii.gz")
    ref = nib.load(str(phantom_dir / "segmentation-0.nii.gz"))
    mask = np.asanyarray(nib.load(str(tmp_path / "mask.nii.gz")).dataobj)
    assert mask.shape == ref.shape and (mask & (np.asanyarray(ref.dataobj) >= 1)).any()  # finds some liver


def test_two_workers_end_to_end(ray_local, mlflow_uri, store_path, tmp_path, monkeypatch, phantom_dir):
    """Two workers, the 3-channel input (slice and neighbours) through training, logging and inference."""
    canary = "liverseg-canary-Secret-7f3a9"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)  # a secret in the environment must not be logged
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", canary)
    cfg = _cfg(
        tmp_path,
        "train.epochs=3",
        "scaling.num_workers=2",
        "run.name=e2e",
        "train.lr=0.003",
        "model.in_channels=3",
        "run.system_metrics_s=0.5",
    )
    res = train(store_path, cfg)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    for key in ("train_loss", "val_loss", "val_dice", "val_iou", "val_precision", "val_recall"):
        assert [m.step for m in client.get_metric_history(res.run_id, key)] == [0, 1, 2], key
    p, t = run.data.params, run.data.tags
    assert p["train.lr"] == "0.003" and p["scaling.num_workers"] == "2" and p["loss.dice_weight"] == "1.0"
    for tag in (
        "git_commit",
        "dvc_store_md5",
        "store_path",
        "store_digest",
        "format_version",
        "ray_version",
        "torch_version",
    ):
        assert t.get(tag), tag
    contexts = {
        i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs
    }
    assert contexts == {"slices.zarr/train": "training", "slices.zarr/val": "validation"}
    arts = {a.path for a in client.list_artifacts(res.run_id)} | {
        a.path for a in client.list_artifacts(res.run_id, "plots")
    }
    assert {"config.json", "plots/curves.png", "plots/val_overlay.png"} <= arts
    assert res.best_val_dice > _chance_dice(store_path)
    assert "system/cpu_utilization_percentage" in run.data.metrics and "system/system_memory_usage_megabytes" in (
        run.data.metrics
    )
    # the LoggedModel carries the scores of the epoch its weights come from, not epoch 0's
    saved = client.get_logged_model(res.model_uri.removeprefix("models:/"))
    model_metrics = {m.key: m for m in saved.metrics}
    assert {m.step for m in saved.metrics} == {res.best_epoch}
    assert model_metrics["val_dice"].value == pytest.approx(res.best_val_dice)
    logged = " ".join([*p.keys(), *map(str, p.values()), *t.keys(), *map(str, t.values())])
    assert canary not in logged
    _check_logged_model(res, phantom_dir, tmp_path)
    assert list((tmp_path / "ray" / "e2e").glob("checkpoint_*"))
    again = train(store_path, cfg)  # same name: finished run is returned, nothing retrained
    assert again.resumed_finished and again.run_id == res.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_resume_after_injected_failure(ray_local, mlflow_uri, store_path, tmp_path, monkeypatch):
    from liverseg.core.env import FAIL_AT_EPOCH

    monkeypatch.setenv(FAIL_AT_EPOCH, "1")
    cfg = _cfg(
        tmp_path,
        "train.epochs=3",
        "train.steps_per_epoch=2",
        "run.name=crashy",
        "run.max_failures=1",
    )
    res = train(store_path, cfg)
    client = MlflowClient(mlflow_uri)
    hist = client.get_metric_history(res.run_id, "val_dice")
    assert sorted(m.step for m in hist) == [0, 1, 2]  # every epoch once: epoch 0 not redone
    assert len(client.search_runs([client.get_run(res.run_id).info.experiment_id])) == 1
    assert client.get_run(res.run_id).info.status == "FINISHED"


def test_unknown_encoder_lists_choices():
    from liverseg.core.errors import ModelError
    from liverseg.model.network import build_model

    with pytest.raises(ModelError, match="unknown encoder 'resnet51'.*resnet50"):
        build_model("resnet51")


def test_local_weights_file(tmp_path):
    import torch

    from liverseg.model.network import build_model

    src = build_model("resnet18", "none", 3)
    torch.save(src.encoder.state_dict(), tmp_path / "enc.pth")  # an RGB encoder, as ImageNet files are
    grey = build_model("resnet18", str(tmp_path / "enc.pth"), 1)
    w_rgb, w_grey = src.encoder.conv1.weight, grey.encoder.conv1.weight
    assert w_grey.shape[1] == 1 and torch.allclose(w_grey[:, 0], w_rgb.sum(1))


@pytest.mark.slow
def test_learns_liver_above_0_9(ray_local, mlflow_uri, tmp_path):
    """Honest learning check: 12 phantoms, disjoint train/val cases, CPU, a few minutes."""
    from liverseg.data.ingest import ingest
    from liverseg.data.phantoms import write_phantoms

    write_phantoms(tmp_path / "raw", 12, seed=5, shape=(64, 64, 24))
    store = str(tmp_path / "s.zarr")
    assert ingest(tmp_path / "raw", store, IngestConfig(size=(64, 64), workers=2), progress=False).ok
    st = SliceStore(store)
    assert not set(st.cases_in("train")) & set(st.cases_in("val"))
    cfg = load_config(
        TrainConfig,
        None,
        [
            "model.encoder=resnet18",
            "model.encoder_weights=none",
            "model.decoder_channels=[128,64,32,16,8]",
            "train.epochs=8",
            "train.batch_size=16",
            "train.lr=0.002",
            "scaling.cpus_per_worker=2",
            f"run.storage_path={tmp_path / 'ray'}",
            "run.name=learn",
        ],
    )
    res = train(store, cfg)
    assert res.best_val_dice > 0.9, res.best_val_dice


def test_preflight_fails_in_seconds_before_ray(tmp_path, monkeypatch, store_path, mlflow_uri):
    """No GPU with scaling.use_gpu=true, or ImageNet weights offline: one line, no Ray, no MLflow run
    (the `paper` profile on a CPU machine once retried for ever and left its run RUNNING)."""
    import subprocess
    import sys

    from liverseg.core.config import TrainConfig
    from liverseg.core.errors import ModelError, TrainError
    from liverseg.core.loading import load_config
    from liverseg.training.runtime import preflight

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing downloaded before
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainError, match="no GPU in the Ray cluster .*set scaling.use_gpu=false"):
        preflight(
            load_config(
                TrainConfig, None, ["model.encoder_weights=none", "scaling.use_gpu=true", "scaling.num_workers=64"]
            )
        )
    with pytest.raises(ModelError, match="unavailable offline: use encoder_weights=none or a local file"):
        preflight(load_config(TrainConfig, None, ["model.encoder=resnet18", "model.encoder_weights=imagenet"]))
    sets = ["--set", "model.encoder_weights=none", "--set", "scaling.use_gpu=true", "--set", "scaling.num_workers=64"]
    res = subprocess.run(
        [sys.executable, "-m", "liverseg.cli", "train", "--store", store_path, *sets],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr  # (MLflow logs its new database first)
    assert res.stderr.splitlines()[-1].startswith("error: no GPU in the Ray cluster")
    from mlflow.tracking import MlflowClient

    assert not MlflowClient(mlflow_uri).search_runs([e.experiment_id for e in MlflowClient().search_experiments()])


_HOLD_LOCAL_RAY = (
    "import sys, ray; from liverseg.training.runtime import ensure_ray; ensure_ray(None); "
    "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"
)
_CONNECT = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); print('connected')"


@pytest.mark.slow
def test_local_ray_refuses_a_driver_without_the_token():
    """The Ray that train/tune start locally listens on every interface (Ray's gRPC servers ignore the
    node address): it must run with token auth (Ray >= 2.60's default for a new local cluster, which
    liverseg keeps), so a driver from elsewhere without the token is refused."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    temp = tempfile.mkdtemp(prefix="lsray", dir="/tmp")  # its own Ray temp root: other local Rays unaffected
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")} | {"RAY_TMPDIR": temp}
    host = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCAL_RAY], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        gcs = host.stdout.readline().strip()
        assert gcs and not gcs.startswith("127."), gcs  # reachable from the network: hence the token

        def connect(mode: str) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-c", _CONNECT, gcs]
            return subprocess.run(cmd, env=env | {"RAY_AUTH_MODE": mode}, capture_output=True, text=True, timeout=180)

        intruder = connect("disabled")
        assert intruder.returncode != 0 and "connected" not in intruder.stdout, intruder.stdout
        assert "auth" in intruder.stderr.lower(), intruder.stderr[-2000:]
        assert connect("token").stdout.strip() == "connected"  # with the token (~/.ray/auth_token) it gets in
    finally:
        host.stdin.close()
        host.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
