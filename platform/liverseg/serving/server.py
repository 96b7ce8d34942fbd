"""The server process: uvicorn with its limits (connections, header deadline, open files), SIGHUP to
reload, the alias follower started, repeated warnings rate-limited."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

from liverseg.core import env
from liverseg.core.config import ServeSection
from liverseg.core.limits import MAX_UPLOAD_BYTES
from liverseg.serving.app import create_app
from liverseg.serving.holder import ModelHolder
from liverseg.serving.webhook import Verifier


def serve(
    uri: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    max_bytes: int = MAX_UPLOAD_BYTES,
    cfg: ServeSection | None = None,
) -> None:
    """Run the service until interrupted; follows the alias (webhook + polling), SIGHUP reloads.

    Secrets come from the environment: LIVERSEG_RELOAD_TOKEN (bearer token of POST /reload) and
    LIVERSEG_WEBHOOK_SECRET (the MLflow webhook's HMAC secret); without them those routes refuse.
    """
    import uvicorn

    cfg = cfg or ServeSection()
    holder = ModelHolder(uri, device)
    verifier = Verifier(env.get(env.WEBHOOK_SECRET), cfg.webhook_max_age_s)
    app = create_app(holder, max_bytes, env.get(env.RELOAD_TOKEN), verifier, cfg)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=holder.reload, daemon=True).start())
    holder.follow(cfg.poll_s)
    info = holder.current.info
    files = _raise_open_files_limit()
    if files < cfg.max_connections + 64:  # the model, logs and sockets of its own need some too
        print(f"warning: {files} open files allowed, serve.max_connections={cfg.max_connections}", flush=True)
    print(f"serving {info.name or uri} v{info.version or '?'} on http://{host}:{port}", flush=True)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        loop="asyncio",
        http=_header_deadline_protocol(cfg.header_timeout_s),
        limit_concurrency=cfg.max_connections,
    )
    quiet = OncePerMinute()
    logging.getLogger("uvicorn.error").addFilter(quiet)  # uvicorn's logger for refused and invalid requests
    try:
        asyncio.run(_serve_quietly(uvicorn.Server(config), quiet))
    finally:
        holder.stop()


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
