"""Team accounts and roles on an MLflow tracking server with basic-auth (`liverseg users add`).

MLflow grants READ / EDIT / MANAGE per experiment and per registered model, and registering a version
needs the same EDIT as moving an alias. So what a role may change is split over two registered models:

    <name>-candidates  every registered version, alias `challenger`   scientist EDIT, release EDIT
    <name>             what serving serves, alias `champion`           release EDIT; everyone else READ

A `reader` (serving replicas, dashboards) gets no grant at all: the server's default READ is all it needs
to load `@champion`, and a leaked serving password then cannot register or move anything.

Promotion copies the candidate version into <name> (MLflow's copy_model_version) and moves `champion`
there; the serving URI stays `models:/<name>@champion`. Experiments: the server's default permission
is READ (everyone sees every run), and whoever creates an experiment gets MANAGE on it, so scientists
create their own experiments and runs, and only the owner (or the admin) can delete one. The server
enforces all of it (403); the CLI checks first only to refuse in one line before a gate runs.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any

from liverseg.core import env
from liverseg.core.errors import PermissionRefused, TeamError
from liverseg.tracking.tags import SERVED_MODEL, candidate_model

SERVED, CANDIDATES = "served", "candidates"
# role -> {which registered model: permission}; anything not listed stays at the server's default, READ
ROLES: dict[str, dict[str, str]] = {
    "reader": {},  # serving accounts: least privilege, READ only
    "scientist": {CANDIDATES: "EDIT"},
    "release": {CANDIDATES: "EDIT", SERVED: "EDIT"},
}
CAN_CHANGE = ("EDIT", "MANAGE")  # permissions that may move an alias or add a version


def grants(role: str, name: str) -> list[tuple[str, str, str]]:
    """(resource type, registered model, permission) a role gets for model `name`."""
    if role not in ROLES:
        raise TeamError(f"role {role!r}: unknown; valid roles: {', '.join(ROLES)}")
    models = {SERVED: name, CANDIDATES: candidate_model(name)}
    return [("registered_model", models[which], perm) for which, perm in ROLES[role].items()]


def password_from_stdin(text: str) -> str:
    """The password piped to `--password-stdin` (like `docker login`): stdin's text without its final
    newline. Read from a pipe it never appears in /proc/*/cmdline, where every local user could see it."""
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise TeamError("--password-stdin: stdin is empty; pipe the password in, e.g. printenv PW | liverseg ...")
    if "\n" in password:
        raise TeamError("--password-stdin: stdin has more than one line; pipe only the password")
    return password


def refusal(user: str, action: str, model: str, has: str, needs: str = "EDIT") -> str:
    return f"refused: {user} may not {action}: needs {needs} on registered model '{model}', has {has}"


@dataclass
class Server:
    """An MLflow server's REST API as one user (basic-auth)."""

    uri: str
    user: str
    password: str

    def call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        import requests

        r = requests.request(method, self.uri.rstrip("/") + path, auth=(self.user, self.password), timeout=30, **kw)
        if r.status_code not in ok:
            try:  # MLflow's JSON error says what is wrong ("Password must be at least 12 characters.")
                body = r.json().get("message", r.text)
            except ValueError:
                body = r.text
            body = body.strip().splitlines()[0][:200] if body.strip() else ""
            raise TeamError(f"{method} {path} as {self.user}: HTTP {r.status_code} {body}")
        if r.status_code != 200 or not r.headers.get("content-type", "").startswith("application/json"):
            return {}  # an accepted "not found" reads as empty
        return r.json()


def _admin() -> Server:
    """The admin's session, from the variables deploy/local/up.sh prints."""
    login = {"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")}
    login |= {k: env.get(k) for k in (env.ADMIN_USER, env.ADMIN_PASSWORD)}
    missing = [k for k, v in login.items() if not v]
    if missing:
        raise TeamError(f"set {', '.join(missing)} (the admin's login; deploy/local/up.sh prints them)")
    uri = login["MLFLOW_TRACKING_URI"]
    if not uri.startswith(("http://", "https://")):
        raise TeamError(f"MLFLOW_TRACKING_URI={uri}: accounts need a tracking server (http)")
    return Server(uri, login[env.ADMIN_USER], login[env.ADMIN_PASSWORD])


def ensure_models(server: Server, name: str) -> None:
    """Both registered models exist, created by the admin (a scientist creating <name> would own it)."""
    for model in (name, candidate_model(name)):
        if not server.call("GET", "/api/2.0/mlflow/registered-models/get", ok=(200, 404), params={"name": model}):
            server.call("POST", "/api/2.0/mlflow/registered-models/create", json={"name": model})


def add_user(username: str, role: str, password: str | None = None, name: str = SERVED_MODEL) -> str:
    """Create `username` with `role`'s permissions on model `name`; returns the password (generated when
    not given). Admin login from LIVERSEG_ADMIN_USER / LIVERSEG_ADMIN_PASSWORD."""
    to_grant = grants(role, name)  # an unknown role fails before anything is created
    server = _admin()
    password = password or secrets.token_urlsafe(18)
    if server.call("GET", "/api/2.0/mlflow/users/get", ok=(200, 404), params={"username": username}):
        raise TeamError(f"user {username}: already exists on {server.uri}")
    ensure_models(server, name)
    server.call("POST", "/api/2.0/mlflow/users/create", json={"username": username, "password": password})
    for resource_type, resource, permission in to_grant:
        server.call(
            "POST",
            "/api/3.0/mlflow/users/permissions/grant",
            json={
                "username": username,
                "resource_type": resource_type,
                "resource_id": resource,
                "permission": permission,
            },
        )
    return password


def check_can_change(model: str, action: str) -> None:
    """Refuse in one line, before any work, when the tracking server would refuse the current user
    (MLFLOW_TRACKING_USERNAME) changing registered model `model`. No-op without a server login."""
    uri, user = os.environ.get("MLFLOW_TRACKING_URI", ""), os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if not (uri.startswith(("http://", "https://")) and user):
        return  # local SQLite: one user, nothing to enforce
    server = Server(uri, user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    got = server.call(
        "GET",
        "/api/3.0/mlflow/users/permissions/get",
        params={"username": user, "resource_type": "registered_model", "resource_id": model},
    )
    if got.get("permission") not in CAN_CHANGE:
        raise PermissionRefused(refusal(user, action, model, got.get("permission", "nothing")))
