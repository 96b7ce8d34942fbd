"""MLflow plumbing: the store's splits as dataset inputs, the client's retries and what a failure says."""

import json
import shutil
from pathlib import Path

import pytest
from mlflow.data.schema import TensorDatasetSchema
from mlflow.tracking import MlflowClient

from liverseg.data.store import SliceStore
from liverseg.tracking.provenance import store_datasets


def test_store_datasets_identify_content_not_path(mlflow_uri, store_path, tmp_path):
    st = SliceStore(store_path)
    inputs = store_datasets(st, store_path, {"train": "training", "val": "validation"})
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"slices.zarr/train", "slices.zarr/val"}
    train = by_name["slices.zarr/train"]
    assert {t.key: t.value for t in train.tags} == {"mlflow.data.context": "training"}
    assert json.loads(train.dataset.profile) == {
        "cases": len(st.cases_in("train")),
        "slices": sum(st.num_slices(c) for c in st.cases_in("train")),
    }
    schema = TensorDatasetSchema.from_dict(json.loads(train.dataset.schema))
    assert schema.features.input_names() == ["image"] and schema.targets.input_names() == ["mask"]
    assert train.dataset.digest != by_name["slices.zarr/val"].dataset.digest

    copy = tmp_path / "elsewhere" / "slices.zarr"  # same content, another path: same digest
    shutil.copytree(store_path, copy)
    moved = {i.dataset.name: i.dataset for i in store_datasets(SliceStore(str(copy)), str(copy), {"train": "training"})}
    assert moved["slices.zarr/train"].digest == train.dataset.digest
    assert json.loads(moved["slices.zarr/train"].source) == {"uri": str(copy)}

    client = MlflowClient(mlflow_uri)  # and MLflow takes them as they are
    rid = client.create_run(client.create_experiment("t")).info.run_id
    client.log_inputs(rid, datasets=inputs)
    logged = client.get_run(rid).inputs.dataset_inputs
    assert sorted((i.dataset.name, i.dataset.digest) for i in logged) == sorted(
        (i.dataset.name, i.dataset.digest) for i in inputs
    )


def test_git_commit_outside_git_is_the_image_build_argument(tmp_path, monkeypatch):
    from liverseg.tracking.provenance import git_commit

    monkeypatch.delenv("LIVERSEG_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"  # not a repository, nothing recorded
    monkeypatch.setenv("LIVERSEG_GIT_COMMIT", "0123abc")
    assert git_commit(tmp_path) == "0123abc"  # a container image: the commit it was built from
    assert git_commit(Path(__file__).parent) not in ("unknown", "0123abc")  # a checkout: git's own answer


@pytest.mark.slow
def test_a_stopped_server_is_said_in_seconds_and_an_absent_version_is_not_found(tmp_path, monkeypatch):
    """Before: MLflow's client retried a stopped server for about 4 minutes (7 retries, backoff 2), and
    any failure to resolve a version read "not found in the registry". After: liverseg's retry defaults
    (MLflow's own variables, where unset) and one line saying which: absent, or the server unreachable."""
    import os
    import time

    import pytest

    from liverseg.core.errors import RegistryError, TrackingError
    from liverseg.tracking.models import resolve_version
    from liverseg.tracking.runs import MLFLOW_DEFAULTS, client
    from support.servers import start_mlflow_server

    for key in MLFLOW_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    server = start_mlflow_server(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    try:
        with pytest.raises(RegistryError, match=f"models:/liver-unet@champion: not found in {server.uri}$"):
            resolve_version(client(), "models:/liver-unet@champion")
        assert all(os.environ[k] == v for k, v in MLFLOW_DEFAULTS.items())  # set where the user had set none
    finally:
        server.stop()
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=f"tracking server {server.uri} is not reachable") as e:
        resolve_version(client(), "models:/liver-unet@champion")
    assert time.monotonic() - t0 < 30 and "\n" not in str(e.value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's own setting wins
    assert client() is not None and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
