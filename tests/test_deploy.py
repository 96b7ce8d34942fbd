"""deploy/ manifests: parse, required fields, MLflow auth on, secrets from the environment only."""

import yaml

from conftest import REPO

DEPLOY = REPO / "deploy"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_are_well_formed():
    kinds = {}
    for f in [*DEPLOY.glob("ray/*.yaml"), DEPLOY / "mlflow" / "k8s.yaml", DEPLOY / "serve" / "deployment.yaml"]:
        for d in _docs(f):
            assert {"apiVersion", "kind", "metadata"} <= set(d), f
            assert d["metadata"].get("name"), f
            kinds.setdefault(d["kind"], []).append(d)
    assert {"RayCluster", "RayJob", "Deployment", "Service"} <= set(kinds)
    job = kinds["RayJob"][0]
    assert "liverseg tune" in job["spec"]["entrypoint"] and "--profile paper" in job["spec"]["entrypoint"]
    workers = kinds["RayCluster"][0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    serve = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "liverseg-serve")
    args = serve["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["liverseg", "serve"] and "models:/liver-unet@champion" in args


def test_mlflow_stack_has_auth_and_no_inline_secrets():
    compose = yaml.safe_load((DEPLOY / "mlflow" / "docker-compose.yml").read_text())
    assert {"postgres", "minio", "mlflow"} <= set(compose["services"])
    cmd = compose["services"]["mlflow"]["command"]
    assert "--app-name basic-auth" in cmd and "postgresql://" in cmd and "s3://" in cmd
    for svc in compose["services"].values():
        for key, value in (svc.get("environment") or {}).items():
            if any(w in key for w in ("PASSWORD", "SECRET", "KEY")):
                assert str(value).startswith("${"), (key, value)  # from the environment only
    k8s = (DEPLOY / "mlflow" / "k8s.yaml").read_text()
    assert "basic-auth" in k8s and "secretKeyRef" in k8s
