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


def test_every_shipped_auth_config_installs_the_guard():
    """The compose ini, the Kubernetes Secret gen-secrets.sh writes, and the local stack's."""
    ini = configparser.ConfigParser()
    ini.read(REPO / "deploy" / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["authorization_function"] == "liverseg.registry.guard:authenticate"
    for script in ("deploy/gen-secrets.sh", "deploy/local/up.sh"):
        assert "authorization_function = liverseg.registry.guard:authenticate" in (REPO / script).read_text(), script
