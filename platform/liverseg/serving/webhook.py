"""MLflow registry webhooks for serving replicas: check a delivery's signature, register a replica's URL.

MLflow 3.17 signs each delivery the Standard Webhooks way (`mlflow/webhooks/delivery.py`): headers
`X-MLflow-Delivery-Id`, `X-MLflow-Timestamp` (Unix seconds) and `X-MLflow-Signature: v1,<base64>`,
the HMAC-SHA256 under the webhook's secret of `"{delivery_id}.{timestamp}.{body}"`. A replica takes
the secret from `LIVERSEG_WEBHOOK_SECRET`; the same variable is read when registering it.

The tracking server must allow plain-http and private addresses for replicas on a cluster network
(`MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`, `MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`), and creating
webhooks needs an MLflow admin account.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from liverseg.core import env
from liverseg.core.errors import ConfigError, TrackingError
from liverseg.core.limits import WEBHOOK_MAX_BYTES, WEBHOOK_MAX_DEPTH
from liverseg.tracking.runs import client as mlflow_client

SECRET_ENV = env.WEBHOOK_SECRET
EVENT = "model_version_alias.created"
SIGNATURE_HEADER = "x-mlflow-signature"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
DELIVERY_HEADER = "x-mlflow-delivery-id"


class WebhookRejected(ValueError):
    """A delivery that must not be acted on; `status` is the HTTP answer (400, 401 or 403)."""

    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status


@dataclass(frozen=True)
class AliasEvent:
    """A verified `model_version_alias.created` delivery: registered model, alias, version."""

    delivery_id: str
    name: str
    alias: str
    version: str


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` over `delivery_id.timestamp.body`, as MLflow signs."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Verifier:
    """Checks signature, freshness and replay of deliveries (one per replica; thread-safe enough:
    the replay memory is a bounded dict updated under the GIL)."""

    def __init__(self, secret: str | None, max_age_s: float, remember: int = 1024):
        self.secret, self.max_age_s, self.remember = secret, max_age_s, remember
        self._seen: OrderedDict[str, None] = OrderedDict()

    def verify(self, headers: dict[str, str], body: bytes, now: float) -> AliasEvent | None:
        """The alias event of an authentic delivery, None for an authentic one of another kind.

        Raises WebhookRejected: 403 when no secret is configured, 401 for a missing or wrong
        signature, a timestamp more than `max_age_s` seconds from `now`, or a delivery id seen before.
        """
        if not self.secret:
            raise WebhookRejected(403, f"webhook disabled: {SECRET_ENV} is not set on this replica")
        h = {k.lower(): v for k, v in headers.items()}
        delivery, stamp, sig = h.get(DELIVERY_HEADER), h.get(TIMESTAMP_HEADER), h.get(SIGNATURE_HEADER)
        if not (delivery and stamp and sig):
            raise WebhookRejected(401, "unsigned delivery: X-MLflow-Delivery-Id, -Timestamp and -Signature required")
        if not hmac.compare_digest(sig.encode(), signature(self.secret, delivery, stamp, body).encode()):
            raise WebhookRejected(401, "bad signature: not signed with this replica's webhook secret")
        if not stamp.isdigit() or abs(now - int(stamp)) > self.max_age_s:
            raise WebhookRejected(401, f"stale delivery: timestamp {stamp} is over {self.max_age_s:.0f} s from now")
        if delivery in self._seen:
            raise WebhookRejected(401, f"replayed delivery {delivery}")
        self._seen[delivery] = None
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return parse_event(delivery, body)


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, counted without parsing it (brackets inside
    strings do not count): the standard library's parser recurses once per level and has no limit."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            escaped, in_string = (not escaped and byte == 0x5C), (escaped or byte != 0x22)
        elif byte == 0x22:  # "
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def parse_event(delivery_id: str, body: bytes) -> AliasEvent | None:
    """The alias event in an (authentic) body, None for other events; WebhookRejected(400) if malformed,
    larger than WEBHOOK_MAX_BYTES or nested deeper than WEBHOOK_MAX_DEPTH (checked before parsing)."""
    if len(body) > WEBHOOK_MAX_BYTES:
        raise WebhookRejected(400, f"signed body of {len(body)} bytes exceeds the limit of {WEBHOOK_MAX_BYTES}")
    if json_depth(body) > WEBHOOK_MAX_DEPTH:
        raise WebhookRejected(400, f"signed body nests deeper than {WEBHOOK_MAX_DEPTH} levels; not an MLflow payload")
    try:
        doc = json.loads(body)
        if (doc.get("entity"), doc.get("action")) != ("model_version_alias", "created"):
            return None
        data = doc["data"]
        return AliasEvent(delivery_id, str(data["name"]), str(data["alias"]), str(data["version"]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise WebhookRejected(400, "signed body is not an MLflow webhook payload") from None


def add_webhook(url: str, secret: str | None = None, name: str | None = None) -> Any:
    """Register (or refresh) the webhook that tells the replica at `url` about new aliases.

    Idempotent per URL: an existing webhook for the same URL gets the secret and event again and is
    re-activated. The secret defaults to `LIVERSEG_WEBHOOK_SECRET`. Returns MLflow's Webhook.
    """
    secret = secret or env.get(SECRET_ENV)
    if not secret:
        raise ConfigError(f"{SECRET_ENV}: not set; the replica and the webhook need the same shared secret")
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    name = name or "liverseg-serve-" + hashlib.sha256(url.encode()).hexdigest()[:12]
    try:
        existing = next((w for w in _all_webhooks(client) if w.url == url), None)
        if existing is not None:
            return client.update_webhook(existing.webhook_id, events=[EVENT], secret=secret, status="ACTIVE")
        return client.create_webhook(name, url, events=[EVENT], secret=secret, description=f"liverseg replica {url}")
    except MlflowException as e:  # e.g. not an admin, or a server without webhooks
        raise TrackingError(f"webhook {url}: {str(e.message).splitlines()[0]}") from None


def remove_webhook(url: str) -> int:
    """Delete the webhooks that deliver to `url`; returns how many."""
    client = mlflow_client()
    found = [w for w in _all_webhooks(client) if w.url == url]
    for w in found:
        client.delete_webhook(w.webhook_id)
    return len(found)


def _all_webhooks(client) -> list[Any]:
    out, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out
