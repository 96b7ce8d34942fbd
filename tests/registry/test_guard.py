"""The guard's reading of MLflow's routes (which request writes what); its rules run on the team stack
(tests/system/test_governance.py), where a real MLflow server with basic-auth enforces them."""

import configparser

import pytest

from liverseg.registry.guard import request_kind
from support.paths import REPO


@pytest.mark.parametrize(
    ("method", "path", "kind", "reads"),
    [
        ("POST", "/api/2.0/mlflow/experiments/create", "CreateExperiment", False),
        ("POST", "/ajax-api/2.0/mlflow/experiments/create", "CreateExperiment", False),  # the UI's route too
        ("POST", "/api/2.0/mlflow/runs/search", "SearchRuns", True),  # a POST that only reads
        ("GET", "/api/2.0/mlflow/experiments/search", "SearchExperiments", True),
        ("POST", "/api/2.0/mlflow/registered-models/set-tag", "SetRegisteredModelTag", False),
        ("DELETE", "/api/2.0/mlflow/registered-models/delete-tag", "DeleteRegisteredModelTag", False),
        ("POST", "/api/2.0/mlflow/registered-models/alias", "SetRegisteredModelAlias", False),
        ("DELETE", "/api/2.0/mlflow/registered-models/alias", "DeleteRegisteredModelAlias", False),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/3/abc/artifacts/w.pt", "UploadArtifact", False),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts/3/abc/artifacts/w.pt", "DownloadArtifact", True),
        ("POST", "/api/2.0/mlflow/logged-models", "CreateLoggedModel", False),
        ("POST", "/ajax-api/2.0/mlflow/upload-artifact", "", False),  # a Flask route outside the protos: by method
        ("POST", "/graphql", "", True),  # MLflow's GraphQL "mutations" are searches
        ("PATCH", "/api/2.0/mlflow/users/update-password", "", True),  # MLflow allows the admin or the user only
    ],
)
def test_requests_are_read_or_write_as_mlflow_routes_them(method, path, kind, reads):
    assert request_kind(path, method) == (kind, reads)


def test_every_shipped_auth_config_installs_the_guard(tmp_path):
    """The compose ini, the Kubernetes Secret gen-secrets.sh writes and the local stack's, each as
    rendered from the one template."""
    import subprocess
    import sys

    import yaml

    def guard(text: str) -> str:
        ini = configparser.ConfigParser()
        ini.read_string(text)
        return ini["mlflow"]["authorization_function"]

    rendered = {"compose": (REPO / "deploy" / "mlflow" / "basic_auth.ini").read_text()}
    out = tmp_path / "secrets.yaml"
    subprocess.run(["bash", str(REPO / "deploy" / "gen-secrets.sh"), "k8s", str(out)], check=True, capture_output=True)
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    rendered["k8s"] = next(d for d in docs if d["metadata"]["name"] == "mlflow-auth")["stringData"]["basic_auth.ini"]
    sys.path.insert(0, str(REPO / "deploy" / "local"))
    try:
        import services
    finally:
        sys.path.remove(str(REPO / "deploy" / "local"))
    rendered["local"] = services.auth_ini("postgresql+psycopg://u:p@127.0.0.1:5432/mlflow_auth")
    assert {k: guard(v) for k, v in rendered.items()} == dict.fromkeys(rendered, "liverseg.registry.guard:authenticate")
