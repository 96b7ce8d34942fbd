"""liverseg's guard inside the MLflow tracking server: the rules MLflow's permissions cannot express,
enforced where every client (liverseg, MLflow's UI, its REST API) has to pass.

Installed as basic-auth's `authorization_function` (basic_auth.ini:
`authorization_function = liverseg.registry.guard:authenticate`), MLflow's documented hook that runs on
every request (Flask routes and, through MLflow's bridge, its FastAPI artifact routes) before MLflow's
own permission checks: it logs the user in exactly as MLflow's basic auth does, then refuses (403, or
409 for a lost race) what liverseg forbids. For non-admin users:

- a `reader` (or a login with no liverseg role) writes nothing at all; a `monitor` creates no
  experiment and changes nothing in the model registry (runs in liverseg-shadow are MLflow's EDIT);
- history and request records (`liverseg.history.<seq>`, `liverseg.request.<seq>` tags) are
  append-only: no overwrite, no delete; a new record must be the next number, name the current head's
  sha256 as `prev` and its sender as `by`; it is claimed with a plain INSERT of the tag row, so of two
  concurrent records for one number (two hosts promoting at once) exactly one is kept;
- an approval names a request its approver did not make;
- `champion` moves only to the version the last history record made champion, and is never deleted.

The admin is exempt (MLflow's own rule for admins): only the admin may repair or rewrite history.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from typing import Any

from liverseg.core.limits import MLFLOW_TAG_VALUE_CHARS
from liverseg.registry.team import LEVEL, parse_role_name
from liverseg.tracking.chain import Record, read_chain, seq_of
from liverseg.tracking.tags import CHAMPION, HISTORY_PREFIX, REQUEST_PREFIX, candidate_model

_G = "liverseg_guard"  # flask.g slot: MLflow asks for the login several times per request
READ_PREFIXES = ("Get", "Search", "List", "BatchGet", "Query", "Calculate", "Download")
READS = {"CreatePresignedDownloadUrl"}  # mints a download link: a read
WRITES = {"GetOrCreateUserQueue"}
ROLE_TTL_S = 10.0  # a role change reaches every worker within this
_roles: dict[str, tuple[float, bool, int]] = {}
_roles_lock = threading.Lock()


def authenticate() -> Any:
    """MLflow's basic-auth login, then liverseg's rules: the Authorization, or a refusal Response."""
    from flask import g, request
    from mlflow.server.auth import authenticate_request_basic_auth
    from werkzeug.datastructures import Authorization

    if g.get(_G) is not None:
        return g.get(_G)
    auth = authenticate_request_basic_auth()
    if not isinstance(auth, Authorization):
        return auth  # 401, as MLflow answers it
    setattr(g, _G, auth)  # MLflow's validators, called from our checks, ask for the login again
    refused = check(request, auth.username)
    if refused is not None:
        setattr(g, _G, refused)
        return refused
    return auth


@functools.cache
def _routes() -> tuple[dict[tuple[str, str], str], list[tuple[Any, str, str]]]:
    """(path, method) -> request class name for MLflow's REST endpoints; path-parameter routes as regexes."""
    import re

    from mlflow.protos.mlflow_artifacts_pb2 import MlflowArtifactsService
    from mlflow.server.handlers import MlflowService, ModelRegistryService, WebhookService, get_service_endpoints

    exact, patterns = {}, []
    for service in (MlflowService, ModelRegistryService, MlflowArtifactsService, WebhookService):
        for path, cls, methods in get_service_endpoints(service, lambda c: c):
            for method in methods:
                if "<" in path:
                    regex = re.sub(r"<[^>]+>", "([^/]+)", re.sub(r"<path:[^>]+>", "(.+)", path))  # Flask's converters
                    patterns.append((re.compile(regex), method, cls.__name__))
                else:
                    exact[(path, method)] = cls.__name__
    return exact, patterns


def request_kind(path: str, method: str) -> tuple[str, bool]:
    """(MLflow request class name or '', whether it only reads)."""
    exact, patterns = _routes()
    name = exact.get((path, method)) or next((n for p, m, n in patterns if m == method and p.fullmatch(path)), "")
    if name:
        return name, (name.startswith(READ_PREFIXES) or name in READS) and name not in WRITES
    if "/mlflow/users/" in path or "/mlflow/roles/" in path or path.endswith("/graphql"):
        return "", True  # accounts: MLflow lets only the admin (or the user, for a password) write; GraphQL searches
    return "", method in ("GET", "HEAD", "OPTIONS")


def _level(username: str) -> tuple[bool, int]:
    """(is admin, highest liverseg role level; -1 for none), cached for ROLE_TTL_S seconds."""
    from mlflow.server.auth import store

    now = time.monotonic()
    with _roles_lock:
        hit = _roles.get(username)
    if hit and now - hit[0] < ROLE_TTL_S:
        return hit[1], hit[2]
    user = store.get_user(username)
    levels = [LEVEL[p[0]] for r in store.list_user_roles(user.id) if (p := parse_role_name(r.name))]
    with _roles_lock:
        _roles[username] = (now, bool(user.is_admin), max(levels, default=-1))
    return bool(user.is_admin), max(levels, default=-1)


def refuse(status: int, message: str) -> Any:
    from flask import Response

    code = "RESOURCE_ALREADY_EXISTS" if status == 409 else "PERMISSION_DENIED"
    return Response(json.dumps({"error_code": code, "message": message}), status=status, mimetype="application/json")


def check(request: Any, username: str) -> Any | None:
    """None to let MLflow's own checks decide, or the refusal."""
    kind, reads = request_kind(request.path, request.method)
    if reads:
        return None
    admin, level = _level(username)
    if admin:
        return None
    if level <= LEVEL["reader"]:
        return refuse(403, f"refused: {username} has the reader role (or none): reader accounts write nothing")
    registry = kind in _registry_writes()
    if level == LEVEL["monitor"] and (kind == "CreateExperiment" or registry):
        return refuse(403, f"refused: {username} has the monitor role: it writes runs in liverseg-shadow only")
    rule = {
        "SetRegisteredModelTag": _on_set_tag,
        "DeleteRegisteredModelTag": _on_delete_tag,
        "SetRegisteredModelAlias": _on_set_alias,
        "DeleteRegisteredModelAlias": _on_delete_alias,
    }.get(kind)
    return rule(username) if rule else None


@functools.cache
def _registry_writes() -> frozenset[str]:
    exact, patterns = _routes()
    names = set(exact.values()) | {n for _, _, n in patterns}
    from mlflow.protos import model_registry_pb2

    return frozenset(
        n for n in names if hasattr(model_registry_pb2, n) and not n.startswith(READ_PREFIXES) and "Webhook" not in n
    )


def _message(cls_name: str) -> Any:
    from mlflow.protos import model_registry_pb2
    from mlflow.server.handlers import _get_request_message

    return _get_request_message(getattr(model_registry_pb2, cls_name)())


def _model_tags(name: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException
    from mlflow.server.handlers import _get_model_registry_store

    try:
        return dict(_get_model_registry_store().get_registered_model(name).tags or {})
    except MlflowException:
        return None  # no such model: MLflow's handler answers that


def _on_delete_tag(username: str) -> Any | None:
    msg = _message("DeleteRegisteredModelTag")
    if msg.key.startswith((HISTORY_PREFIX, REQUEST_PREFIX)):
        return refuse(403, f"refused: {msg.key} on {msg.name}: records are append-only (only the admin may remove one)")
    return None


def _on_delete_alias(username: str) -> Any | None:
    msg = _message("DeleteRegisteredModelAlias")
    if msg.alias == CHAMPION:
        return refuse(
            403, f"refused: {msg.name}@{CHAMPION} is never deleted by users; `liverseg rollback` moves it back"
        )
    return None


def _on_set_alias(username: str) -> Any | None:
    from liverseg.tracking.chain import history_head

    msg = _message("SetRegisteredModelAlias")
    model_tags = _model_tags(msg.name) if msg.alias == CHAMPION else None
    if model_tags is None:
        return None
    head = history_head(model_tags, HISTORY_PREFIX)
    if head is None or head.to_version != str(msg.version):
        named = f"v{head.to_version}, which history record {head.seq:06d} made champion" if head else "none"
        return refuse(
            403,
            f"refused: {msg.name}@{CHAMPION} moves only with its history record (`liverseg promote`, `liverseg "
            f"rollback`): the next move allowed is to {named}, not v{msg.version}",
        )
    return None


def _on_set_tag(username: str) -> Any | None:
    msg = _message("SetRegisteredModelTag")
    prefix = next((p for p in (HISTORY_PREFIX, REQUEST_PREFIX) if msg.key.startswith(p)), None)
    if prefix is None:
        return None
    from mlflow.server.auth import _validate_can_update_registered_model_or_prompt

    if not _validate_can_update_registered_model_or_prompt():
        return None  # MLflow's own check refuses it next, before anything is claimed
    model_tags = _model_tags(msg.name)
    if model_tags is None:
        return None
    refused = _check_record(username, msg.name, prefix, msg.key, msg.value, model_tags)
    return refused or _claim(msg.name, msg.key, msg.value)


def _check_record(username: str, model: str, prefix: str, key: str, value: str, model_tags: dict[str, str]):
    seq, chain = seq_of(prefix, key), read_chain(model_tags, prefix)
    try:
        values = json.loads(value)
        if not isinstance(values, dict) or seq is None or values.get("seq") != seq:
            raise ValueError(f"the key is {prefix}<6 digits> and the value a JSON object with that seq")
        record = Record.from_values(values, seq) if prefix == HISTORY_PREFIX else None
    except (TypeError, ValueError) as e:
        return refuse(403, f"refused: {key}: not a liverseg record ({e})")
    if key in model_tags:
        return refuse(403, f"refused: {key} on {model} exists: records are append-only (only the admin may change one)")
    if len(value) > MLFLOW_TAG_VALUE_CHARS or values.get("by") != username:
        return refuse(403, f"refused: {key}: over {MLFLOW_TAG_VALUE_CHARS} characters, or not by {username}")
    head = chain.head
    if seq != chain.next_seq() or values.get("prev") != chain.head_digest():
        last = f"{head.key} by {head.values.get('by')} at {head.values.get('at')}" if head else "none"
        return refuse(
            409,
            f"refused: {model} changed meanwhile: {key} is not the next record after {last}; "
            "nothing of this change was recorded or moved (run it again)",
        )
    if record is not None and (stale := _stale(record, model_tags)):
        return refuse(409, f"refused: {model} changed meanwhile: {stale}; nothing of this change was recorded or moved")
    return _check_approval(username, model, record) if record is not None and record.request else None


def _stale(record: Record, model_tags: dict[str, str]) -> str:
    """Why `record` does not start where the history stands ("" when it does): a promotion computed
    against a champion another change has replaced since must not be recorded."""
    from liverseg.tracking.chain import history_head

    head = history_head(model_tags, HISTORY_PREFIX)
    if head is None or record.from_version == head.to_version:
        return ""
    return f"it starts from v{record.from_version}, but the last record ({head.seq:06d} by {head.by}) left v{head.to_version} champion"


def _check_approval(username: str, model: str, record: Record) -> Any | None:
    requests = read_chain(_model_tags(candidate_model(model)) or {}, REQUEST_PREFIX)
    found = [e for e in requests.entries if str(e.seq) == record.request]
    if not found:
        return refuse(403, f"refused: request {record.request} of {candidate_model(model)} does not exist")
    if record.action == "promote" and found[0].values.get("by") == username:
        return refuse(403, f"refused: {username} may not approve request {record.request}: they made it themselves")
    decided = [e for e in read_chain(_model_tags(model) or {}, HISTORY_PREFIX).entries]
    if any(str(e.values.get("request") or "") == record.request for e in decided):
        return refuse(409, f"refused: request {record.request} was decided already")
    return None


def _claim(model: str, key: str, value: str) -> Any | None:
    """Insert the record's tag row (the handler then writes the same value again): the database's primary
    key lets one writer per number through, whatever the number of server workers or hosts."""
    import sqlalchemy
    from mlflow.exceptions import MlflowException
    from mlflow.server.handlers import _get_model_registry_store
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModelTag

    store = _get_model_registry_store()
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            rm = store._get_registered_model(session, model)
            session.add(SqlRegisteredModelTag(workspace=rm.workspace, name=model, key=key, value=value))
            session.flush()
    except MlflowException as e:
        if isinstance(e.__cause__, sqlalchemy.exc.IntegrityError):
            return refuse(
                409, f"refused: {model}: {key} was written first by another change; nothing of this one was moved"
            )
        raise
    return None
