"""MLflow plumbing: the store's splits as dataset inputs."""

import json
import shutil

from mlflow.data.schema import TensorDatasetSchema
from mlflow.tracking import MlflowClient

from liverseg.store import SliceStore
from liverseg.tracking import store_datasets


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
