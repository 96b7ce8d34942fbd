"""deploy/: the Dockerfile, the Kubernetes manifests (Kubernetes and KubeRay schemas offline, then the
references between objects), the secrets generator, docker compose, and the bucket job against a real
S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import configparser
import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import tomllib
import yaml
from referencing import Registry, Resource

from support.net import free_port
from support.paths import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "mlflow" / "docker-compose.yml"
NAMESPACE = "liverseg"
# the oldest Kubernetes KubeRay 1.7 supports and the newest whose schemas kubernetes-validate ships
K8S_VERSIONS = ("1.30", "1.37")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
WORKLOADS = {"Deployment", "StatefulSet", "Job"}


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def secrets_yaml(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("secrets") / "secrets.yaml"
    subprocess.run(["bash", str(DEPLOY / "gen-secrets.sh"), "k8s", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def objects(secrets_yaml) -> list[dict]:
    """Every object `kubectl apply` would see: the manifests plus the generated Secrets."""
    files = sorted(K8S.rglob("*.yaml")) + [secrets_yaml]
    return [d for f in files for d in _yaml_docs(f)]


def _by_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _ray_node_templates(obj: dict) -> list[dict]:
    """The head's and the worker groups' pod templates of a RayCluster or RayJob (none for others)."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayJob":
        spec = spec.get("rayClusterSpec") or {}  # none: the job runs on an existing cluster (clusterSelector)
    if obj["kind"] in ("RayJob", "RayCluster") and spec:
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    return []


def _pod_templates(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] in WORKLOADS:
        return [spec["template"]]
    submitter = [spec["submitterPodTemplate"]] if obj["kind"] == "RayJob" and "submitterPodTemplate" in spec else []
    return _ray_node_templates(obj) + submitter


def _containers(obj: dict) -> list[dict]:
    return [c for t in _pod_templates(obj) for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


# --- schemas -------------------------------------------------------------------------------------------


def test_every_manifest_matches_the_kubernetes_schemas(objects):
    builtin = [o for o in objects if not o["apiVersion"].startswith("ray.io/")]
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "Job", "NetworkPolicy"} <= {
        o["kind"] for o in builtin
    }
    for obj in builtin:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {e.message}")


def _kuberay_validator(version: str = K8S_VERSIONS[-1]) -> jsonschema.Draft202012Validator:
    """The hand-written KubeRay schema, its pod templates resolved against Kubernetes' definitions."""
    schema = yaml.safe_load((REPO / "tests" / "fixtures" / "kuberay_v1_schema.yaml").read_text())
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    definitions = json.loads((root / "_definitions.json").read_text())
    registry = Registry().with_resources([(definitions["$id"], Resource.from_contents(definitions))])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_kuberay_resources_match_the_crd_schema(objects):
    ray = [o for o in objects if o["apiVersion"].startswith("ray.io/")]
    assert {o["kind"] for o in ray} == {"RayCluster", "RayJob"}
    validator = _kuberay_validator()
    for obj in ray:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplica"), 2),  # misspelt field
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "2"),  # wrong type
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # KubeRay wants strings
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "imag"), "x"),  # pod
        (("spec", "shutdownAfterJobFinish"), True),
    ],
)
def test_kuberay_schema_refuses_broken_resources(objects, path, value):
    job = copy.deepcopy(_by_kind(objects, "RayJob")["liverseg-tune"])
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert not _kuberay_validator().is_valid(job)


def _kuberay_rule_errors(obj: dict) -> list[str]:
    """What KubeRay v1.7's controller refuses beyond the schema (utils/validation.go), for what we use."""
    errors, spec = [], obj["spec"]
    if obj["kind"] == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if spec.get("backoffLimit", 0) < 0 or spec.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append("negative backoffLimit/ttlSecondsAfterFinished")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append("one of rayClusterSpec or clusterSelector must be set")
        if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict):
            errors.append("runtimeEnvYAML is not a YAML mapping")
        spec = spec.get("rayClusterSpec") or {}
    for g in spec.get("workerGroupSpecs", []):
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)  # the CRD's defaults
        n = g.get("replicas", lo)
        if not 0 <= lo <= n <= hi:
            errors.append(f"worker group {g['groupName']}: need 0 <= minReplicas <= replicas <= maxReplicas")
    # ours on top: the Ray container (KubeRay's first) of every group runs one image, one Python and Ray
    if len({t["spec"]["containers"][0]["image"] for t in _pod_templates(obj)}) > 1:
        errors.append("head and workers must run one image (same Python and Ray on every node)")
    return errors


def test_kuberay_resources_pass_the_controllers_rules(objects):
    for obj in objects:
        if obj["kind"] in ("RayCluster", "RayJob"):
            assert not _kuberay_rule_errors(obj), (obj["metadata"]["name"], _kuberay_rule_errors(obj))
    broken = copy.deepcopy(_by_kind(objects, "RayCluster")["liverseg"])
    broken["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    assert "need 0 <= minReplicas" in " ".join(_kuberay_rule_errors(broken))
    broken = copy.deepcopy(_by_kind(objects, "RayJob")["liverseg-tune"])
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "x:1"
    broken["spec"]["shutdownAfterJobFinishes"] = False
    assert len(_kuberay_rule_errors(broken)) == 2  # ttl without shutdown; two images


# --- references between objects -------------------------------------------------------------------------


def test_one_namespace_and_every_reference_resolves(objects):
    assert _by_kind(objects, "Namespace").keys() == {NAMESPACE}
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']}"
    secrets = {n: set(o["stringData"]) for n, o in _by_kind(objects, "Secret").items()}
    maps = {n: set(o["data"]) for n, o in _by_kind(objects, "ConfigMap").items()}
    for o in objects:
        where = f"{o['kind']}/{o['metadata']['name']}"
        for c in _containers(o):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in secrets.get(r["name"], ()), f"{where}: secret {r['name']}/{r['key']}"
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in maps.get(r["name"], ()), f"{where}: configmap {r['name']}/{r['key']}"
            for e in c.get("envFrom", []):
                if "secretRef" in e:
                    assert e["secretRef"]["name"] in secrets, f"{where}: secret {e['secretRef']['name']}"
                if "configMapRef" in e:
                    assert e["configMapRef"]["name"] in maps, f"{where}: configmap {e['configMapRef']['name']}"
        for t in _pod_templates(o):
            for v in t["spec"].get("volumes", []):
                if "secret" in v:
                    assert v["secret"]["secretName"] in secrets, f"{where}: volume {v['name']}"
                if "configMap" in v:
                    assert v["configMap"]["name"] in maps, f"{where}: volume {v['name']}"


def test_env_references_are_defined_before_use(objects):
    """Kubernetes expands $(VAR) only for variables defined earlier in the same container's env."""
    for o in objects:
        for c in _containers(o):
            seen = set()
            for e in c.get("env", []):
                for var in re.findall(r"\$\((\w+)\)", str(e.get("value", ""))):
                    assert var in seen, f"{o['metadata']['name']}/{c['name']}: $({var}) before its definition"
                seen.add(e["name"])


def test_services_select_pods_and_name_their_ports(objects):
    pods = [
        (t.get("metadata", {}).get("labels", {}), t["spec"]["containers"]) for o in objects for t in _pod_templates(o)
    ]
    services = _by_kind(objects, "Service")
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        matched = [cs for labels, cs in pods if selector.items() <= labels.items()]
        assert matched, f"service {name}: selector {selector} matches no pod template"
        ports = {p.get("name") for cs in matched for c in cs for p in c.get("ports", [])}
        numbers = {p["containerPort"] for cs in matched for c in cs for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in ports | numbers, f"service {name}: targetPort {target} not on its pods"
    for name, sts in _by_kind(objects, "StatefulSet").items():
        governing = services.get(sts["spec"]["serviceName"])
        assert governing and governing["spec"].get("clusterIP") == "None", f"statefulset {name}: headless service"
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


def _image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return bool(tag) and tag != "latest" and any(ch.isdigit() for ch in tag)


def test_every_image_is_pinned_and_ours_match_the_package_version(objects):
    images = {c["image"] for o in objects for c in _containers(o)}
    assert images, "no containers found"
    for image in images:
        assert _image_pinned(image), f"{image}: unpinned"
        assert "example" not in image, f"{image}: placeholder"
        if image.startswith("liverseg:"):
            assert image in (f"liverseg:{VERSION}-cpu", f"liverseg:{VERSION}-cuda"), image
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, svc in compose["services"].items():
        assert _image_pinned(svc["image"]), f"compose {name}: {svc['image']}"
    assert not _image_pinned("minio/minio:latest") and not _image_pinned("ghcr.io/x/liverseg")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_mlflow_server_auth_admin_and_auth_database(objects, secrets_yaml):
    (mlflow,) = _containers(_by_kind(objects, "Deployment")["mlflow"])
    assert mlflow["command"][:2] == ["mlflow", "server"] and "--app-name=basic-auth" in mlflow["args"]
    env = _env(mlflow)
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[var]["valueFrom"], var  # the variables MLflow 3.17 reads, from a Secret
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith(
        "postgresql+psycopg://mlflow:$(POSTGRES_PASSWORD)@postgres:"
    )
    # the auth settings file is on a read-only Secret mount: its database must live elsewhere
    mount = next(
        m for m in mlflow["volumeMounts"] if env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(m["mountPath"])
    )
    volume = next(v for v in _pod_templates(_by_kind(objects, "Deployment")["mlflow"])[0]["spec"]["volumes"])
    assert volume["name"] == mount["name"] and volume["secret"]["secretName"] == "mlflow-auth"
    ini = configparser.ConfigParser()
    ini.read_string(_by_kind(objects, "Secret")["mlflow-auth"]["stringData"]["basic_auth.ini"])
    assert "admin_password" not in ini["mlflow"]
    uri = ini["mlflow"]["database_uri"]
    assert uri.startswith("postgresql+psycopg://mlflow:") and uri.endswith("@postgres:5432/mlflow_auth"), uri
    init_sql = _by_kind(objects, "ConfigMap")["postgres-init"]["data"]
    assert any("CREATE DATABASE mlflow_auth;" in sql for sql in init_sql.values())
    pg_password = _by_kind(objects, "Secret")["postgres"]["stringData"]["POSTGRES_PASSWORD"]
    assert f"mlflow:{pg_password}@" in uri  # generated together, so they agree


def test_clients_reach_services_that_exist(objects):
    config = _by_kind(objects, "ConfigMap")[NAMESPACE]["data"]
    services = _by_kind(objects, "Service")
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        m = re.fullmatch(r"http://([\w-]+)\.(\w+)\.svc:(\d+)", config[key])
        assert m, f"{key}={config[key]}: want http://SERVICE.NAMESPACE.svc:PORT"
        name, ns, port = m.group(1), m.group(2), int(m.group(3))
        assert ns == NAMESPACE and port in {p["port"] for p in services[name]["spec"]["ports"]}, key
    (mlflow,) = _containers(_by_kind(objects, "Deployment")["mlflow"])
    allowed = _env(mlflow)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    host = config["MLFLOW_TRACKING_URI"].split("://")[1]
    assert host in allowed, f"MLflow would refuse Host {host} (DNS-rebinding guard)"


def test_rayjob_leaves_nothing_on_the_head_pod(objects):
    job = _by_kind(objects, "RayJob")["liverseg-tune"]["spec"]
    entry = " ".join(job["entrypoint"].split())
    assert job["shutdownAfterJobFinishes"] is True
    assert "--set run.storage_path=s3://" in entry and "--store s3://" in entry
    tune, _, register = entry.partition(" && ")
    out = re.search(r"--out (\S+)", tune).group(1)
    assert tune.startswith("liverseg tune ") and register == f"liverseg register --best-of-tune {out}", entry


def test_serving_replicas_follow_the_champion_with_secrets(objects):
    sts = _by_kind(objects, "StatefulSet")["liverseg-serve"]
    assert sts["spec"]["replicas"] >= 2
    (serve,) = _containers(sts)
    assert serve["args"][:2] == ["liverseg", "serve"] and "--model=models:/liver-unet@champion" in serve["args"]
    env = _env(serve)
    for var in ("LIVERSEG_RELOAD_TOKEN", "LIVERSEG_WEBHOOK_SECRET", "MLFLOW_TRACKING_PASSWORD"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "liverseg-serve", var
    (mlflow,) = _containers(_by_kind(objects, "Deployment")["mlflow"])
    assert _env(mlflow)["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"]["value"] == "true"  # in-cluster replica webhooks


# --- hardening: pod security, Ray token auth, network policies -------------------------------------------


def _container_hardened(security: dict) -> bool:
    return security.get("allowPrivilegeEscalation") is False and "ALL" in security.get("capabilities", {}).get(
        "drop", []
    )


def _hardening_errors(obj: dict) -> list[str]:
    """Pods run the runtime's seccomp filter, drop every capability, never gain privileges, and get no
    Kubernetes API token unless they need the API (only an autoscaling Ray head does: its sidecar scales
    the workers through the API)."""
    errors, where = [], f"{obj['kind']}/{obj['metadata']['name']}"
    autoscaled = obj["kind"] == "RayCluster" and obj["spec"].get("enableInTreeAutoscaling", False)
    head = obj["spec"]["headGroupSpec"]["template"] if autoscaled else None
    for t in _pod_templates(obj):
        pod = t["spec"]
        if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errors.append(f"{where}: pod without seccompProfile RuntimeDefault")
        if pod.get("automountServiceAccountToken", True) != (t is head):
            errors.append(f"{where}: automountServiceAccountToken should be {t is head}")
        for c in pod.get("initContainers", []) + pod["containers"]:
            if not _container_hardened(c.get("securityContext", {})):
                errors.append(f"{where}/{c['name']}: allowPrivilegeEscalation false and drop ALL needed")
    if autoscaled and not _container_hardened(obj["spec"].get("autoscalerOptions", {}).get("securityContext", {})):
        errors.append(f"{where}: autoscaler sidecar: allowPrivilegeEscalation false and drop ALL needed")
    return errors


def test_every_pod_is_hardened(objects):
    hardened = [o for o in objects if _pod_templates(o)]
    assert {o["kind"] for o in hardened} == {"Deployment", "StatefulSet", "Job", "RayCluster", "RayJob"}
    for obj in hardened:
        assert not _hardening_errors(obj), _hardening_errors(obj)
    broken = copy.deepcopy(_by_kind(objects, "RayCluster")["liverseg"])
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"] = {}
    broken["spec"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] = False
    assert len(_hardening_errors(broken)) == 2  # the worker's container; the autoscaler's API token


def test_ray_token_auth_on_every_node_the_autoscaler_and_the_submitter(objects):
    token = _by_kind(objects, "Secret")["ray-auth"]["stringData"]["auth_token"]
    assert len(token) >= 32
    ray = [o for o in objects if o["kind"] in ("RayCluster", "RayJob")]
    carriers = [c for o in ray for c in _containers(o)]
    carriers += [o["spec"]["autoscalerOptions"] for o in ray if o["spec"].get("enableInTreeAutoscaling")]
    assert "ray-job-submitter" in {c.get("name") for c in carriers}
    for c in carriers:
        env = _resolved_env(c, objects)
        assert (env.get("RAY_AUTH_MODE"), env.get("RAY_AUTH_TOKEN")) == ("token", token), c.get("name", "autoscaler")


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"{selector}: only matchLabels is checked here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _sources(policies: list[dict], pods: list[dict], labels: dict, port: int) -> set[str]:
    """Who may open `port` on a pod labelled `labels`: the `app` of every pod template a peer selects,
    `namespace NAME` for a namespace peer, `label K=V` for a pod peer that matches no template here."""
    found: set[str] = set()
    for policy in policies:
        if not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                continue
            for peer in rule.get("from", [{"anyone": True}]):
                if "anyone" in peer or "ipBlock" in peer:
                    found.add("anyone")
                elif "namespaceSelector" in peer:
                    found.add("namespace " + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
                else:
                    apps = {p["app"] for p in pods if _selects(peer["podSelector"], p)}
                    found |= apps or {",".join(f"label {k}={v}" for k, v in peer["podSelector"]["matchLabels"].items())}
    return found


def test_network_policies_deny_by_default_and_allow_only_the_named_paths(objects):
    policies = list(_by_kind(objects, "NetworkPolicy").values())
    assert any(p["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]} for p in policies), "default deny"
    pods = [t["metadata"]["labels"] for o in objects for t in _pod_templates(o)]
    head, worker = {"app": "ray", "liverseg.io/ray-node": "head"}, {"app": "ray", "liverseg.io/ray-node": "worker"}
    assert head in pods and worker in pods
    client, ingress = "label liverseg.io/client=true", "namespace ingress-nginx"
    assert _sources(policies, pods, {"app": "postgres"}, 5432) == {"mlflow"}
    assert _sources(policies, pods, {"app": "minio"}, 9000) == {"mlflow", "ray", "make-bucket"}
    assert _sources(policies, pods, {"app": "minio"}, 9001) == set()  # the console: port-forward only
    assert _sources(policies, pods, head, 6379) == _sources(policies, pods, worker, 20000) == {"ray"}
    assert _sources(policies, pods, head, 10001) == {"ray", "ray-submitter", client}
    assert _sources(policies, pods, {"app": "mlflow"}, 5000) == {"ray", "liverseg-serve", client, ingress}
    assert _sources(policies, pods, {"app": "liverseg-serve"}, 8080) == {ingress, "mlflow", client}
    assert _sources(policies, pods, {"app": "make-bucket"}, 9000) == set()  # a client, nobody connects to it


def test_every_service_is_reachable_through_some_allow_rule(objects):
    policies = list(_by_kind(objects, "NetworkPolicy").values())
    templates = [t for o in objects for t in _pod_templates(o)]
    pods = [t["metadata"]["labels"] for t in templates]
    for name, svc in _by_kind(objects, "Service").items():
        for t in templates:
            if not _selects({"matchLabels": svc["spec"]["selector"]}, t["metadata"]["labels"]):
                continue
            numbers = {p.get("name"): p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
            ports = [numbers.get(p.get("targetPort"), p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]]
            allowed = [port for port in ports if _sources(policies, pods, t["metadata"]["labels"], port)]
            assert allowed, f"service {name}: no NetworkPolicy lets anyone reach its pods on {ports}"


# --- secrets --------------------------------------------------------------------------------------------


def test_secrets_are_generated_fresh_and_never_overwritten(tmp_path, secrets_yaml):
    from cryptography.fernet import Fernet

    gen = DEPLOY / "gen-secrets.sh"
    a, b = tmp_path / "a.env", tmp_path / "b.env"
    for f in (a, b):
        subprocess.run(["bash", str(gen), "compose", str(f)], check=True, capture_output=True)
    env_a = dict(line.split("=", 1) for line in a.read_text().splitlines())
    env_b = dict(line.split("=", 1) for line in b.read_text().splitlines())
    assert env_a.keys() == env_b.keys() and a.stat().st_mode & 0o077 == 0
    for key in env_a:
        if key.endswith(("PASSWORD", "KEY")):
            assert env_a[key] != env_b[key] and len(env_a[key]) >= 32, key
    Fernet(env_a["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"].encode())  # MLflow can use it
    # every ${VAR:?...} compose insists on is in the generated .env
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required and required <= env_a.keys(), required - env_a.keys()
    before = a.read_text()
    again = subprocess.run(["bash", str(gen), "compose", str(a)], capture_output=True, text=True)
    assert again.returncode == 1 and "exists; not overwritten" in again.stderr and a.read_text() == before
    assert secrets_yaml.stat().st_mode & 0o077 == 0


def test_nothing_committed_holds_a_password():
    tracked = subprocess.run(["git", "ls-files", "deploy", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    for rel in tracked.stdout.split():
        text = (REPO / rel).read_text()
        assert "change-me" not in text, rel
        if rel.endswith((".yaml", ".yml")):
            assert "kind: Secret" not in text, f"{rel}: Secrets are generated (deploy/gen-secrets.sh), not committed"


# --- docker compose -------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec():
    """The Compose Specification's schema, as check-jsonschema ships it (offline)."""
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    schema = json.loads((vendor / "compose-spec.json").read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert not [e.message for e in validator.iter_errors(compose)]
    compose["services"]["mlflow"]["enviroment"] = {}  # a misspelt key is refused
    assert not validator.is_valid(compose)


def test_compose_hands_mlflow_its_passwords_from_the_environment():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "minio", "bucket", "mlflow"} <= services.keys()
    mlflow = services["mlflow"]
    env = mlflow["environment"]
    assert (
        "--app-name=basic-auth" in mlflow["command"]
        and "--artifacts-destination=s3://liverseg/artifacts" in mlflow["command"]
    )
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg://mlflow:${POSTGRES_PASSWORD}@postgres:5432/mlflow"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_AUTH_ADMIN_PASSWORD:?")
    assert mlflow["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    assert services["bucket"]["command"][-2:] == ["/app/deploy/make_bucket.py", "liverseg"]
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if any(w in key for w in ("PASSWORD", "SECRET", "_KEY")):
                assert str(value).startswith("${"), (name, key)  # from the environment only
            # a credential inside a URL is interpolated too
            assert "@" not in re.sub(r"\$\{\w+(:[?-][^}]*)?\}", "", str(value)) or ":${" in str(value), (name, key)


def _ini(text: str) -> dict[str, str]:
    ini = configparser.ConfigParser()
    ini.read_string(text)
    return dict(ini["mlflow"])


def _local_services():
    sys.path.insert(0, str(DEPLOY / "local"))
    try:
        import services
    finally:
        sys.path.remove(str(DEPLOY / "local"))
    return services


def test_every_mlflow_server_is_lean_and_shares_one_auth_template(objects):
    """Kubernetes, compose, the local stack and the tests' servers: no GenAI job runner, a pooled database,
    sized workers, and deploy/mlflow/basic_auth.ini (its bounded credential cache) with only the auth
    database told apart."""
    from support.servers import LEAN_MLFLOW

    template = _ini((DEPLOY / "mlflow" / "basic_auth.ini").read_text())
    assert int(template["auth_cache_ttl_seconds"]) > 0 and int(template["auth_cache_max_size"]) > 0
    same = lambda ini: {k: v for k, v in ini.items() if k != "database_uri"}  # noqa: E731
    (pod,) = _containers(_by_kind(objects, "Deployment")["mlflow"])
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    local = _local_services()
    envs = {
        "kubernetes": {k: e.get("value") for k, e in _env(pod).items()},
        "compose": compose["environment"],
        "local": {**local.LEAN, **local.pool_env(local.POOL_SIZE)},
    }
    for where, env in envs.items():
        assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false", where
        for var in ("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"):
            assert int(env[var]) > 0, (where, var)
    assert LEAN_MLFLOW["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "--workers=2" in pod["args"] and "--workers=2" in compose["command"]
    k8s_ini = _ini(_by_kind(objects, "Secret")["mlflow-auth"]["stringData"]["basic_auth.ini"])
    local_ini = _ini(local.auth_ini("postgresql+psycopg://postgres:pw@127.0.0.1:5432/mlflow_auth"))
    assert same(k8s_ini) == same(local_ini) == same(template)
    assert local_ini["database_uri"].endswith("/mlflow_auth") and k8s_ini["database_uri"].endswith("/mlflow_auth")
    assert any(
        v.endswith("/etc/mlflow-auth/basic_auth.ini:ro") and v.startswith("./basic_auth.ini")
        for v in compose["volumes"]
    )
    # PostgreSQL takes every connection the replicas' pools may open
    pg = _containers(_by_kind(objects, "StatefulSet")["postgres"])[0]
    max_conn = int(pg["args"][pg["args"].index("-c") + 1].split("=")[1])
    replicas = _by_kind(objects, "Deployment")["mlflow"]["spec"]["replicas"]
    per_engine = sum(
        int(envs["kubernetes"][v]) for v in ("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW")
    )
    assert max_conn >= replicas * (2 + 1) * 3 * per_engine
    compose_pg = yaml.safe_load(COMPOSE.read_text())["services"]["postgres"]["command"]
    per_engine = sum(
        int(compose["environment"][v])
        for v in ("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW")
    )
    assert int(compose_pg[compose_pg.index("-c") + 1].split("=")[1]) >= (2 + 1) * 3 * per_engine


def test_compose_keeps_the_auth_database_on_a_writable_volume():
    mlflow = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    ini = configparser.ConfigParser()
    ini.read(DEPLOY / "mlflow" / "basic_auth.ini")
    assert "admin_password" not in ini["mlflow"] and "admin_username" not in ini["mlflow"]
    db = Path(ini["mlflow"]["database_uri"].removeprefix("sqlite:///"))
    mounts = [v.split(":") for v in mlflow["volumes"]]
    (writable,) = [(src, dst) for src, dst, *mode in mounts if db.is_relative_to(dst) and "ro" not in mode]
    assert writable[0] in yaml.safe_load(COMPOSE.read_text())["volumes"], "a named volume, not the repository"
    config_path = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert any(dst == config_path and mode == ["ro"] for _, dst, *mode in mounts)


# --- Dockerfile -----------------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_installs_liverseg_as_make_does():
    text = _dockerfile()
    make_extras = set(
        re.search(r"pip install -q -e '\.\[([\w,]+)\]'", (REPO / "Makefile").read_text()).group(1).split(",")
    )
    image_extras = set(re.search(r"^ARG EXTRAS=([\w,]+)$", text, re.M).group(1).split(","))
    # less the dev tools and the one-machine stack's object store (the image runs with MinIO)
    assert image_extras == make_extras - {"dev", "local"}, "the image installs make's extras, less dev and local"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("mlflow[auth]") for d in deps) and any(d.startswith("psycopg") for d in extras["team"])
    assert 'pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[${EXTRAS}]"' in text
    for base in re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M) + re.findall(r"BASE_IMAGE=(nvidia/\S+)", text):
        assert _image_pinned(base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    # every path it copies is in the build context .dockerignore lets through
    allowed = [
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert path in allowed and (REPO / path).exists(), path


def test_dockerfile_runs_unprivileged_and_holds_no_secret():
    text = _dockerfile()
    user = re.findall(r"^USER (\S+)$", text, re.M)
    uid = re.search(r"^ARG UID=(\d+)$", text, re.M).group(1)
    assert user == ["${UID}"] and int(uid) >= 1000  # numeric: runAsNonRoot can check it
    for name in re.findall(r"^(?:ARG|ENV)\s+(\w+)", text, re.M) + re.findall(r"^\s+(\w+)=", text, re.M):
        assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", name), name
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore: the context starts from nothing (no .env, .venv, .git, data)"


# --- the bucket job, against a real S3-compatible server --------------------------------------------------


@pytest.fixture
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    requests.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=10).raise_for_status()  # state is per process
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _run_make_bucket(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/usr/bin"}
    env |= {"AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}  # one try: the refusal comes at once
    return subprocess.run(
        [sys.executable, str(DEPLOY / "make_bucket.py"), *args], env=env, capture_output=True, text=True
    )


def test_make_bucket_creates_the_bucket_once(s3_server):
    import boto3

    first = _run_make_bucket(s3_server, "liverseg")
    assert first.returncode == 0 and first.stdout.strip().endswith(": created"), first.stderr
    second = _run_make_bucket(s3_server, "liverseg")
    assert second.returncode == 0 and second.stdout.strip().endswith(": exists"), second.stderr
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    )
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["liverseg"]


def test_make_bucket_names_an_unreachable_store_in_one_line():
    r = _run_make_bucket(f"http://127.0.0.1:{free_port()}", "liverseg", "--wait", "0")
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("bucket liverseg at http://127.0.0.1:") and "EndpointConnectionError" in line


def test_pipeline_files_named_by_pods_are_in_the_image(objects):
    """The image copies pipelines/: every `pipelines/*.yaml` a pod names must exist there."""
    named = set()
    for o in objects:
        for c in _containers(o):
            named |= set(re.findall(r"pipelines/[\w.-]+\.yaml", " ".join(c.get("command", []) + c.get("args", []))))
        named |= set(re.findall(r"pipelines/[\w.-]+\.yaml", o.get("spec", {}).get("entrypoint", "")))
    assert {"pipelines/serve.yaml", "pipelines/tune.yaml"} <= named
    assert "COPY pipelines ./pipelines" in _dockerfile()
    for rel in named:
        assert (REPO / rel).is_file(), rel


def test_cluster_doc_names_files_that_exist():
    doc = (REPO / "docs" / "cluster.md").read_text()
    paths = set(re.findall(r"(?<![\w/.])((?:deploy|pipelines|tests)/[\w./-]+\.(?:yaml|yml|sh|py|md))", doc))
    assert {"deploy/k8s/namespace.yaml", "deploy/k8s/ray/rayjob-tune.yaml", "deploy/gen-secrets.sh"} <= paths
    for rel in paths:
        assert (REPO / rel).is_file(), f"docs/cluster.md names {rel}, which does not exist"
    for name in re.findall(r"`([\w-]+\.yaml)`", doc):  # the table's bare file names live in deploy/k8s
        assert list((REPO / "deploy" / "k8s").rglob(name)) or list(REPO.glob(f"*/{name}")), name


# --- the manifests' PostgreSQL, bucket Job and MLflow pod, run here as written ------------------------------


def _resolved_env(container: dict, objects: list[dict]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom, then env (Secret and ConfigMap keys
    looked up, $(VAR) expanded from the variables defined before)."""
    secrets = {n: o["stringData"] for n, o in _by_kind(objects, "Secret").items()}
    maps = {n: o["data"] for n, o in _by_kind(objects, "ConfigMap").items()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= secrets[source["secretRef"]["name"]] if "secretRef" in source else maps[source["configMapRef"]["name"]]
    for e in container.get("env", []):
        ref = e.get("valueFrom", {})
        if "secretKeyRef" in ref:
            env[e["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[e["name"]] = maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    return env


@contextlib.contextmanager
def _postgres(user: str, password: str, db: str, init_sql: list[str]):
    """PostgreSQL on 127.0.0.1 set up as the postgres image sets itself up: superuser `user` with `password`,
    database `db`, then the init scripts. Yields (port, query(db, sql) -> list of values)."""
    import tempfile

    from support.net import free_port

    bindir = (
        Path(shutil.which("initdb") or sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1]).resolve().parent
    )
    root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))  # short: the Unix socket lives here
    root.chmod(0o777)
    (root / "pw").write_text(password + "\n")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []  # initdb refuses root
    port = free_port()
    ctl = [*as_pg, bindir / "pg_ctl", "-D", root / "data"]
    run = lambda *cmd, **kw: subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, **kw)  # noqa: E731
    run(*as_pg, bindir / "initdb", "-D", root / "data", "-U", user, "--auth=scram-sha-256", f"--pwfile={root / 'pw'}")
    run(*ctl, "-w", "-l", root / "log", "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start")
    psql = [bindir / "psql", "-h", "127.0.0.1", "-p", port, "-U", user, "-v", "ON_ERROR_STOP=1", "-tA", "-d"]
    query = lambda db, sql: run(*psql, db, "-c", sql, env={**os.environ, "PGPASSWORD": password}).stdout.split()  # noqa: E731
    try:
        query("postgres", f"CREATE DATABASE {db}")
        for sql in init_sql:
            query(db, sql)
        yield port, query
    finally:
        run(*ctl, "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _mlflow_server(cmd: list[str], env: dict[str, str], root: Path):
    """A container's `mlflow server` command run here: bound to 127.0.0.1 on a free port instead of
    0.0.0.0:5000 (the Host allow-list follows the port, as a `port-forward 5000:5000` would keep it)."""
    from support.net import free_port, wait_http
    from support.servers import stop

    port = free_port()
    cmd = [a.replace("--host=0.0.0.0", "--host=127.0.0.1").replace("--port=5000", f"--port={port}") for a in cmd]
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    env = {**env, "MLFLOW_SERVER_ALLOWED_HOSTS": hosts}
    log = root / "mlflow.log"
    with open(log, "w") as out:
        exe = str(Path(sys.executable).parent / cmd[0])
        proc = subprocess.Popen(
            [exe, *cmd[1:]], env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=root
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log, 180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def _check_team_server(url: str, admin: tuple[str, str], pod_host: str, monkeypatch) -> str:
    """Basic auth on (401 without or with a wrong password), the admin account from the environment, the
    Host names clients use accepted and others refused (403); returns the run id of an artifact logged
    through the proxy."""
    import httpx
    from mlflow.tracking import MlflowClient

    search = url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search, headers={"Host": pod_host}).status_code == 401
    assert httpx.get(search, headers={"Host": pod_host}, auth=(admin[0], "wrong")).status_code == 401
    assert httpx.get(search, headers={"Host": pod_host}, auth=admin).status_code == 200
    assert httpx.get(search, headers={"Host": "attacker.example:5000"}, auth=admin).status_code == 403
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    client = MlflowClient(url)
    run = client.create_run(client.create_experiment("deploy-check"))
    client.log_text(run.info.run_id, "through the proxy", "note.txt")
    return run.info.run_id


def _bucket_keys(endpoint: str, env: dict[str, str]) -> list[str]:
    import boto3

    keys = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{k.lower(): v for k, v in keys.items()})
    return [o["Key"] for o in s3.list_objects_v2(Bucket="liverseg").get("Contents", [])]


def _rehost(env: dict[str, str], local: dict[str, str]) -> dict[str, str]:
    """Service addresses of the namespace (or compose network) -> the servers this test runs on 127.0.0.1."""
    out = {}
    for key, value in env.items():
        for service, here in local.items():
            value = value.replace(service, here)
        out[key] = value
    return out


def _make_bucket(cmd: list[str], env: dict[str, str]) -> None:
    assert cmd[:2] == ["python", "/app/deploy/make_bucket.py"]  # the image's copy of deploy/make_bucket.py
    subprocess.run([sys.executable, str(DEPLOY / "make_bucket.py"), *cmd[2:]], env={**os.environ, **env}, check=True)


@pytest.mark.slow
def test_kubernetes_mlflow_pod_as_written_serves_here(objects, s3_server, tmp_path, monkeypatch):
    """mlflow.yaml's container with its Secrets and ConfigMap, PostgreSQL as postgres.yaml sets it up, the
    bucket made by the make-bucket Job: users in PostgreSQL, artifacts proxied into the bucket."""
    pg = _resolved_env(_containers(_by_kind(objects, "StatefulSet")["postgres"])[0], objects)
    init = list(_by_kind(objects, "ConfigMap")["postgres-init"]["data"].values())
    with _postgres(pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"], init) as (port, query):
        local = {"@postgres:5432": f"@127.0.0.1:{port}", "http://minio.liverseg.svc:9000": s3_server}
        (job,) = _containers(_by_kind(objects, "Job")["make-bucket"])
        job_env = _rehost(_resolved_env(job, objects), local)
        _make_bucket(job["command"], job_env)
        (pod,) = _containers(_by_kind(objects, "Deployment")["mlflow"])
        env = _rehost(_resolved_env(pod, objects), local)
        (mount,) = pod["volumeMounts"]  # Secret mlflow-auth: its key as a read-only file
        assert env["MLFLOW_AUTH_CONFIG_PATH"] == f"{mount['mountPath']}/basic_auth.ini" and mount["readOnly"]
        ini = tmp_path / "basic_auth.ini"
        ini.write_text(
            _rehost({"": _by_kind(objects, "Secret")["mlflow-auth"]["stringData"]["basic_auth.ini"]}, local)[""]
        )
        ini.chmod(0o444)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        with _mlflow_server(pod["command"] + pod["args"], env, tmp_path) as url:
            admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
            run_id = _check_team_server(url, admin, "mlflow.liverseg.svc:5000", monkeypatch)
            assert query("mlflow_auth", "SELECT username FROM users") == [admin[0]]  # users in PostgreSQL
            assert query("mlflow", "SELECT name FROM experiments ORDER BY name") == ["Default", "deploy-check"]
        assert f"artifacts/1/{run_id}/artifacts/note.txt" in _bucket_keys(s3_server, job_env)


def _compose_env(service: dict, dotenv: dict[str, str]) -> dict[str, str]:
    """A compose service's environment interpolated as compose does: ${VAR}, ${VAR:-default}, ${VAR:?error}."""

    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in dotenv:
            return dotenv[name]
        assert op == ":-", f"compose would stop: {name} unset ({arg})"
        return arg

    return {k: re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, str(v)) for k, v in service["environment"].items()}


@pytest.mark.slow
def test_compose_mlflow_as_written_serves_here(s3_server, tmp_path, monkeypatch):
    """docker-compose.yml's mlflow service with a .env from gen-secrets.sh: the admin password from
    MLFLOW_AUTH_ADMIN_PASSWORD, the backend on PostgreSQL with POSTGRES_PASSWORD, the auth database on the
    writable volume, artifacts proxied into the bucket the `bucket` service made."""
    subprocess.run(["bash", str(DEPLOY / "gen-secrets.sh"), "compose", str(tmp_path / ".env")], check=True)
    dotenv = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    pg = _compose_env(services["postgres"], dotenv)
    volume = tmp_path / "mlflow-auth"  # the named volume, mounted writable at /var/lib/liverseg
    volume.mkdir()
    with _postgres(pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"], []) as (port, query):
        local = {"@postgres:5432": f"@127.0.0.1:{port}", "http://minio:9000": s3_server}
        bucket_env = _rehost(_compose_env(services["bucket"], dotenv), local)
        _make_bucket(services["bucket"]["command"], bucket_env)
        env = _rehost(_compose_env(services["mlflow"], dotenv), local)
        ini = (DEPLOY / "mlflow" / "basic_auth.ini").read_text().replace("/var/lib/liverseg", str(volume))
        (tmp_path / "basic_auth.ini").write_text(ini)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
        with _mlflow_server(services["mlflow"]["command"], env, tmp_path) as url:
            admin = (dotenv["MLFLOW_AUTH_ADMIN_USERNAME"], dotenv["MLFLOW_AUTH_ADMIN_PASSWORD"])
            run_id = _check_team_server(url, admin, "mlflow:5000", monkeypatch)
            assert query("mlflow", "SELECT name FROM experiments ORDER BY name") == ["Default", "deploy-check"]
        assert (volume / "basic_auth.db").is_file()  # the auth database, on the volume
    assert f"artifacts/1/{run_id}/artifacts/note.txt" in _bucket_keys(s3_server, bucket_env)


def test_ray_pods_carry_what_a_tuning_job_needs(objects):
    """A RayJob's nodes reach the tracking server as its own MLflow user and the bucket with S3 keys; the
    standing RayCluster the team submits to holds no account (each job brings its submitter's, sealed);
    the rayVersion KubeRay is told is one the image's pip may install (pyproject's range)."""
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_range = next(Requirement(d) for d in deps if d.startswith("ray[")).specifier
    need = {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ENDPOINT_URL"}
    need |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for obj in objects:
        if obj["kind"] not in ("RayCluster", "RayJob"):
            continue
        spec = obj["spec"].get("rayClusterSpec", obj["spec"])
        assert spec["rayVersion"] in ray_range, (obj["metadata"]["name"], spec["rayVersion"], str(ray_range))
        for c in [c for t in _ray_node_templates(obj) for c in t["spec"]["containers"]]:
            env = _resolved_env(c, objects).keys()
            if obj["kind"] == "RayJob":
                assert not need - env, (obj["metadata"]["name"], c["name"], need - env)
            else:
                assert not env & {"MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"}, (c["name"], sorted(env))


def test_the_build_context_builds_the_package(tmp_path):
    """What .dockerignore lets into the build context and the Dockerfile copies before `pip install` is
    enough to build liverseg (a wheel, offline, with the console script)."""
    import zipfile

    text = _dockerfile()
    (tmp_path / "ctx").mkdir()
    for src in re.findall(r"^COPY (.+) \S+$", text[: text.index("RUN pip install")], re.M):
        for rel in src.split():
            if (REPO / rel).is_dir():
                shutil.copytree(REPO / rel, tmp_path / "ctx" / rel, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(REPO / rel, tmp_path / "ctx" / rel)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path / "w")]
    built = subprocess.run([*cmd, str(tmp_path / "ctx")], check=True, capture_output=True, text=True, cwd=tmp_path)
    # the build backend's own output (-v shows it): no deprecation of the project's metadata (license etc.)
    assert not re.search(r"(?i)deprecat|SetuptoolsWarning", built.stdout + built.stderr), built.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("liverseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "liverseg/cli/__init__.py" in names and "liverseg/serving/server.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "liverseg = liverseg.cli:app" in zipfile.ZipFile(wheel).read(entry).decode()
