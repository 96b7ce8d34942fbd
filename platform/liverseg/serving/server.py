"""The server process: uvicorn with its limits (connections, header deadline, open files, trusted
proxies), SIGHUP to reload, the alias followers (champion and shadow) started, the shadow's evidence
written at shutdown, repeated warnings rate-limited."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time

from liverseg.core import env
from liverseg.core.config import ServeSection
from liverseg.core.errors import one_line
from liverseg.serving.app import create_app
from liverseg.serving.holder import ModelHolder
from liverseg.serving.metrics import Metrics
from liverseg.serving.shadow import Shadow
from liverseg.serving.webhook import Verifier


def serve(
    uri: str, host: str = "127.0.0.1", port: int = 8080, device: str = "auto", cfg: ServeSection | None = None
) -> None:
    """Run the service until interrupted; follows the alias (webhook + polling), SIGHUP reloads; with
    `cfg.shadow`, a shadow model segments every answered request too (see `serving.shadow`).

    Secrets come from the environment: LIVERSEG_RELOAD_TOKEN (bearer token of POST /reload) and
    LIVERSEG_WEBHOOK_SECRET (the MLflow webhook's HMAC secret); without them those routes refuse.
    """
    import uvicorn

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the log
    cfg, metrics = cfg or ServeSection(), Metrics()
    holder = ModelHolder(uri, device, "champion", metrics, retry_max_s=cfg.retry_max_s)
    shadow = _shadow(cfg, device, metrics, f"{socket.gethostname()}:{port}") if cfg.shadow else None
    verifier = Verifier(env.get(env.WEBHOOK_SECRET), cfg.webhook_max_age_s)
    app = create_app(holder, cfg, env.get(env.RELOAD_TOKEN), verifier, metrics, shadow)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_reload, args=(holder,), daemon=True).start())
    holder.follow(cfg.poll_s)
    files = _raise_open_files_limit()
    if files < cfg.max_connections + 64:  # the model, logs and sockets of its own need some too
        print(f"warning: {files} open files allowed, serve.max_connections={cfg.max_connections}", flush=True)
    info = holder.current.info
    print(f"serving {info.name or uri} v{info.version or '?'} on http://{host}:{port}", flush=True)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # serving.access writes one JSON line per request instead
        loop="asyncio",
        http=_header_deadline_protocol(cfg.header_timeout_s),
        limit_concurrency=cfg.max_connections,
        proxy_headers=bool(cfg.trusted_proxies),  # else X-Forwarded-For is ignored: it names no one
        forwarded_allow_ips=cfg.trusted_proxies or None,
    )
    quiet = OncePerMinute()
    logging.getLogger("uvicorn.error").addFilter(quiet)  # uvicorn's logger for refused and invalid requests
    # uvicorn shuts down gracefully on SIGTERM, then raises it again with the handler it found: make that
    # handler an exit through `finally` (the shadow's last evidence), not the default instant death
    signal.signal(signal.SIGTERM, _exit)
    try:
        asyncio.run(_serve_quietly(uvicorn.Server(config), quiet))
    finally:
        holder.stop()
        if shadow is not None:
            shadow.holder.stop()
            shadow.stop()  # its last evidence


def _shadow(cfg: ServeSection, device: str, metrics: Metrics, replica: str) -> Shadow:
    """The shadow's holder (following its own alias; a failed load leaves it empty and retrying) and
    thread, its evidence written with the replica's MLflow account."""
    from liverseg.tracking.runs import client
    from liverseg.tracking.shadow import write_evidence

    holder = ModelHolder(cfg.shadow, device, "shadow", metrics, required=False, retry_max_s=cfg.retry_max_s)
    status, reason = holder.status()
    print(f"shadow: {cfg.shadow} v{holder.version}" if holder.current else f"shadow: {reason}", flush=True)
    shadow = Shadow(holder, cfg, metrics, replica, lambda summary, final: write_evidence(client(), summary, final))
    holder.follow(cfg.poll_s)
    shadow.start()
    return shadow


def _exit(signum, frame) -> None:
    raise SystemExit(0)


def _reload(holder: ModelHolder) -> None:
    """SIGHUP: a forced reload; a failure is one line (and /health says degraded)."""
    try:
        holder.reload()
    except Exception as e:
        print(f"warning: reload failed, still serving v{holder.version}: {one_line(e)}", flush=True)


def _raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one (each connection is one); returns the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):  # an unlimited hard limit is above the kernel's nr_open
        return soft


class OncePerMinute(logging.Filter):
    """Lets each distinct warning through at most once a minute, with how often it came meanwhile.

    Under attack, uvicorn warns for every refused request (`Exceeded concurrency limit.`) and asyncio for
    every connection waiting on a process out of file descriptors: a million lines in a minute.
    """

    def __init__(self):
        super().__init__()
        self.said: dict[str, tuple[float, int]] = {}  # message -> (when last said, times since)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if len(self.said) > 1000:  # messages that vary (addresses): forget rather than grow
            self.said.clear()
        when, times = self.said.get(text, (-60.0, 0))
        if time.monotonic() - when < 60:
            self.said[text] = (when, times + 1)
            return False
        self.said[text] = (time.monotonic(), 0)
        if times:
            record.msg, record.args = f"{text} ({times} more in the last minute)", ()
        return True


async def _serve_quietly(server, quiet: OncePerMinute) -> None:
    """`server.serve()` with asyncio's accept errors (one per waiting connection and retry when out of
    file descriptors) reported through `quiet`."""

    def handle(loop, context) -> None:
        if not context.get("message", "").startswith("socket.accept() out of system resource"):
            return loop.default_exception_handler(context)
        record = logging.LogRecord("liverseg.serve", logging.WARNING, "", 0, "", (), None)
        record.msg = f"cannot accept connections: {context.get('exception')}"
        if quiet.filter(record):
            print(f"warning: {record.getMessage()}", flush=True)

    asyncio.get_running_loop().set_exception_handler(handle)
    await server.serve()


def _header_deadline_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request's headers within
    `timeout_s` of opening or of its last answer. uvicorn times only idle keep-alive connections, and
    any byte resets that: a client trickling a request line held its socket for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(timeout_s, self._headers_late)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._headers_late)

        def connection_lost(self, exc) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request under way: its headers are late
                self.transport.close()

    return HeaderDeadline
