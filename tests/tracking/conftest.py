"""Tracking fixtures: the servers behind MLflow, each of which a test may stop."""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Outage:
    """PostgreSQL, an S3 server and MLflow with basic-auth on 127.0.0.1, as the team stack runs them,
    holding a champion (liver-unet v1) and a challenger; `env(user, password)` is a user's shell."""

    pg: object
    s3: object
    server: object
    root: Path
    store: str
    passwords: dict[str, str]
    runs: list[str] = field(default_factory=list)

    def env(self, user: str = "rita", password: str | None = None) -> dict[str, str]:
        import os

        drop = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "LIVERSEG_ADMIN_USER")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MLFLOW_HTTP_")}
        return env | {
            "MLFLOW_TRACKING_URI": self.server.uri,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.passwords[user] if password is None else password,
            "LIVERSEG_LOCK_DIR": str(self.root),
        }


@pytest.fixture(scope="module")
def outage(tmp_path_factory, store_path):
    """An `Outage` stack, up for the module's tests (which stop parts of it), stopped and removed after."""
    import boto3
    from moto.server import ThreadedMotoServer

    from support.servers import start_mlflow_server, start_postgres

    root = tmp_path_factory.mktemp("outage")
    pg = start_postgres(("mlflow", "mlflow_auth"))
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    endpoint = "http://{}:{}".format(*s3.get_host_and_port())
    keys = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in keys.items() if "KEY" in k}).create_bucket(
        Bucket="mlflow"
    )
    admin = secrets.token_urlsafe(16)
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {pg.uri}/mlflow_auth\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server_env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        **keys,
    }
    server = start_mlflow_server(
        root,
        env=server_env,
        backend=f"{pg.uri}/mlflow",
        artifacts="s3://mlflow/artifacts",
        args=("--app-name", "basic-auth"),
    )
    passwords = {"admin": admin, "rita": secrets.token_urlsafe(16), "nobody": secrets.token_urlsafe(16)}
    stack = Outage(pg, s3, server, root, store_path, passwords)
    try:
        _champion_and_challenger(stack)
        yield stack
    finally:
        server.stop()
        s3.stop()
        try:
            pg.stop()
        except AssertionError:  # a test left it stopped
            pass
        shutil.rmtree(pg.dir, ignore_errors=True)


def _champion_and_challenger(stack: Outage) -> None:
    """rita (release) has v1 promoted to champion and a second run registered as challenger; user nobody
    may read nothing of liver-unet."""
    from mlflow.server import get_app_client

    from liverseg.registry.promote import promote
    from liverseg.registry.register import register
    from liverseg.registry.team import add_user
    from support.models import constant_state, log_model_run

    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack.env("admin").items():
            mp.setenv(key, value)
        mp.setenv("LIVERSEG_ADMIN_USER", "admin")
        mp.setenv("LIVERSEG_ADMIN_PASSWORD", stack.passwords["admin"])
        add_user("rita", "release", stack.passwords["rita"])
        auth = get_app_client("basic-auth", tracking_uri=stack.server.uri)
        auth.create_user("nobody", stack.passwords["nobody"])
        auth.grant_user_permission("nobody", "registered_model", "liver-unet", "DENY")
        for key, value in stack.env("rita").items():
            mp.setenv(key, value)
        stack.runs = [log_model_run(constant_state(liver=b), store_path=stack.store)[0] for b in (False, True)]
        register(run_id=stack.runs[0])
        assert promote(stack.store, min_dice=0.0).promoted
        register(run_id=stack.runs[1])
