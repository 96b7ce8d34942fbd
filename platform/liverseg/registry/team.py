"""Team accounts and roles on an MLflow tracking server with basic-auth (`liverseg users ...`).

A role is an MLflow role (basic-auth's RBAC, workspace `default`) named `liverseg-<role>@<model>`; its
permissions are the grants below, on top of the server's `default_permission = READ`:

    reader     nothing more: reads everything, writes nothing (the guard refuses every write)
    monitor    EDIT on experiment liverseg-shadow (a replica's shadow evidence runs); creates nothing else
    scientist  EDIT on <name>-candidates: registers candidates, asks for promotion; own experiments and runs
    release    also EDIT on <name> (the served model) and on experiment liverseg-served (the served copies)

What MLflow's permissions cannot express (a reader or monitor creating experiments, runs, registered
models or artifacts, which MLflow allows any login; append-only history; champion moves only with a
record) the guard adds on the server (`registry.guard`). Accounts are changed through MLflow's own auth
client (`mlflow.server.auth.client.AuthServiceClient`, its route constants in `mlflow.server.auth.routes`)
as the admin, every step repeatable: `users add` completes an account a failure left half made.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from liverseg.core import env
from liverseg.core.errors import PermissionRefused, TeamError
from liverseg.tracking.runs import failure, mlflow_defaults
from liverseg.tracking.tags import SERVED_EXPERIMENT, SERVED_MODEL, SHADOW_EXPERIMENT, candidate_model

SERVED, CANDIDATES, SERVED_RUNS, SHADOW = "served", "candidates", "served-runs", "shadow"
# role -> {which resource: permission}; anything not listed stays at the server's default, READ
ROLES: dict[str, dict[str, str]] = {
    "reader": {},  # serving accounts, dashboards: least privilege
    "monitor": {SHADOW: "EDIT"},  # replicas that shadow a challenger write their evidence runs there
    "scientist": {CANDIDATES: "EDIT"},
    "release": {CANDIDATES: "EDIT", SERVED: "EDIT", SERVED_RUNS: "EDIT"},
}
LEVEL = {role: i for i, role in enumerate(ROLES)}  # reader < monitor < scientist < release
ROLE_PREFIX = "liverseg-"
CAN_CHANGE = ("EDIT", "MANAGE")  # permissions that may move an alias or add a version


def role_name(role: str, model: str) -> str:
    return f"{ROLE_PREFIX}{role}@{model}"


def parse_role_name(name: str) -> tuple[str, str] | None:
    """(role, model) of a liverseg role's name; None for any other role."""
    role, sep, model = name.removeprefix(ROLE_PREFIX).partition("@")
    return (role, model) if name.startswith(ROLE_PREFIX) and sep and role in ROLES and model else None


def grants(role: str, name: str) -> list[tuple[str, str, str]]:
    """(resource type, resource name, permission) a role gets for served model `name`."""
    if role not in ROLES:
        raise TeamError(f"role {role!r}: unknown; valid roles: {', '.join(ROLES)}")
    where = {
        SERVED: ("registered_model", name),
        CANDIDATES: ("registered_model", candidate_model(name)),
        SERVED_RUNS: ("experiment", SERVED_EXPERIMENT),
        SHADOW: ("experiment", SHADOW_EXPERIMENT),
    }
    return [(*where[which], perm) for which, perm in ROLES[role].items()]


def check_username(username: str) -> None:
    """Refuse a login basic auth cannot carry: ':' ends the user part of `user:password`; control
    characters, surrounding blanks or an empty name cannot be typed back."""
    bad = [c for c in username if not c.isprintable()]
    if not username or username != username.strip() or ":" in username or bad or len(username) > 128:
        what = "contains ':'" if ":" in username else f"contains {bad[0]!r}" if bad else "is empty or blank-padded"
        what = "is longer than 128 characters" if len(username) > 128 else what
        raise TeamError(f"user name {username!r}: {what}; use letters, digits, '.', '-', '_' or '@'")


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


def auth_client(uri: str, user: str, password: str) -> Any:
    """MLflow's AuthServiceClient logged in as `user` (it reads the login from MLFLOW_TRACKING_* only)."""
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.utils.credentials import MlflowHostCreds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    creds = MlflowHostCreds(uri, username=user, password=password)

    class _As(AuthServiceClient):
        def _request(self, endpoint, method, *, expected_status: int = 200, **kwargs):  # as the parent's
            resp = verify_rest_response(http_request(creds, endpoint, method, **kwargs), endpoint, expected_status)
            return {} if resp.status_code == 204 or not resp.content else resp.json()

    return _As(uri)


class Admin:
    """The admin's session, from the variables deploy/local/up.sh prints: MLflow's auth client and its
    tracking and registry REST stores, all as the admin."""

    def __init__(self) -> None:
        login = {"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")}
        login |= {k: env.get(k) for k in (env.ADMIN_USER, env.ADMIN_PASSWORD)}
        missing = [k for k, v in login.items() if not v]
        if missing:
            raise TeamError(f"set {', '.join(missing)} (the admin's login; deploy/local/up.sh prints them)")
        self.uri = login["MLFLOW_TRACKING_URI"]
        if not self.uri.startswith(("http://", "https://")):
            raise TeamError(f"MLFLOW_TRACKING_URI={self.uri}: accounts need a tracking server (http)")
        self.user, password = login[env.ADMIN_USER], login[env.ADMIN_PASSWORD]
        from mlflow.store.model_registry.rest_store import RestStore as RegistryStore
        from mlflow.store.tracking.rest_store import RestStore as TrackingStore
        from mlflow.utils.credentials import MlflowHostCreds

        mlflow_defaults()
        self.auth = auth_client(self.uri, self.user, password)
        creds = MlflowHostCreds(self.uri, username=self.user, password=password)
        self.tracking, self.registry = TrackingStore(lambda: creds), RegistryStore(lambda: creds)


def _missing(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "404" in str(e)[:200]


def ensure_resources(admin: Admin, name: str) -> dict[str, str]:
    """Both registered models and both experiments exist, created by the admin (whoever creates one gets
    MANAGE on it: a scientist must not own `name`, a release user not `liverseg-served`). Returns
    {resource name: id} (experiments by id, models by name)."""
    for model in (name, candidate_model(name)):
        try:
            admin.registry.get_registered_model(model)
        except Exception as e:
            if not _missing(e):
                raise
            admin.registry.create_registered_model(model)
    ids = {name: name, candidate_model(name): candidate_model(name)}
    for exp in (SERVED_EXPERIMENT, SHADOW_EXPERIMENT):
        found = admin.tracking.get_experiment_by_name(exp)
        ids[exp] = found.experiment_id if found is not None else admin.tracking.create_experiment(exp)
    return ids


def ensure_role(admin: Admin, role: str, name: str) -> int:
    """The MLflow role for (`role`, `name`) with exactly its grants added (missing ones are added; a
    re-run adds nothing). Returns its id."""
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    to_grant = grants(role, name)
    ids = ensure_resources(admin, name)
    wanted = role_name(role, name)
    found = [r for r in admin.auth.list_roles(DEFAULT_WORKSPACE_NAME) if r.name == wanted]
    role_id = found[0].id if found else admin.auth.create_role(DEFAULT_WORKSPACE_NAME, wanted, f"liverseg {role}").id
    have = {(p.resource_type, p.resource_pattern, p.permission) for p in admin.auth.list_role_permissions(role_id)}
    for resource_type, resource, permission in to_grant:
        if (resource_type, ids[resource], permission) not in have:
            admin.auth.add_role_permission(role_id, resource_type, ids[resource], permission)
    return role_id


def _user_roles(admin: Admin, username: str) -> list[str] | None:
    """The user's liverseg role names, None when the user does not exist."""
    try:
        admin.auth.get_user(username)
    except Exception as e:
        if _missing(e):
            return None
        raise
    return [r.name for r in admin.auth.list_user_roles(username) if parse_role_name(r.name)]


def add_user(username: str, role: str, password: str | None = None, name: str = SERVED_MODEL) -> tuple[str, bool]:
    """Create `username` with `role` for model `name`, or complete an account a failure left without a
    role (its generated password was never shown: a new one is set). Returns (password, completed)."""
    check_username(username)
    grants(role, name)  # an unknown role fails before anything is created
    admin = Admin()
    role_id = ensure_role(admin, role, name)
    roles = _user_roles(admin, username)
    password = password or secrets.token_urlsafe(18)
    if roles:
        hint = "users reset-password" if role_name(role, name) in roles else f"users grant {username} --role {role}"
        raise TeamError(f"user {username}: already exists on {admin.uri} ({', '.join(roles)}); `liverseg {hint}`")
    if roles is None:
        admin.auth.create_user(username, password)
    else:
        admin.auth.update_user_password(username, password)
    admin.auth.assign_role(username, role_id)
    return password, roles is not None


def grant_role(username: str, role: str, name: str = SERVED_MODEL) -> list[str]:
    """Give an existing user `role` for `name` instead of the liverseg role(s) they hold for it; returns
    the roles taken away."""
    check_username(username)
    admin = Admin()
    role_id = ensure_role(admin, role, name)
    roles = _user_roles(admin, username)
    if roles is None:
        raise TeamError(f"user {username}: not found on {admin.uri}; `liverseg users add` creates it")
    taken = [r for r in admin.auth.list_user_roles(username) if (parse_role_name(r.name) or ("", ""))[1] == name]
    if role_name(role, name) not in roles:
        admin.auth.assign_role(username, role_id)
    for r in taken:
        if r.name != role_name(role, name):
            admin.auth.unassign_role(username, r.id)
    return [r.name for r in taken if r.name != role_name(role, name)]


def reset_password(username: str, password: str | None = None) -> str:
    """Set a new password (generated when not given); returns it."""
    check_username(username)
    admin = Admin()
    if _user_roles(admin, username) is None:
        raise TeamError(f"user {username}: not found on {admin.uri}")
    password = password or secrets.token_urlsafe(18)
    admin.auth.update_user_password(username, password)
    return password


def check_can_change(model: str, action: str) -> None:
    """Refuse in one line, before any work, when the tracking server would refuse the current user
    (MLFLOW_TRACKING_USERNAME) changing registered model `model`. No-op without a server login."""
    uri, user = os.environ.get("MLFLOW_TRACKING_URI", ""), os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if not (uri.startswith(("http://", "https://")) and user):
        return  # local SQLite: one user, nothing to enforce
    mlflow_defaults()  # bounded retries: a server or database that is down fails this in seconds, not minutes
    client = auth_client(uri, user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    try:
        got = client.get_user_permission(user, "registered_model", model).permission
    except Exception as e:  # 401 (wrong password), unreachable, 5xx: said as such (`runs.failure`)
        raise failure(e, f"{action}: the permission of {user} on {model}") from None
    if got not in CAN_CHANGE:
        raise PermissionRefused(refusal(user, action, model, got or "nothing"))
