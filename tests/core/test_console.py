"""The console's one line when the tracking server stops answering, and one when it is back (a real HTTP
server on 127.0.0.1 that answers /health, then goes away, then comes back on the same port)."""

import http.server
import io
import threading

from liverseg.core.console import Console, _Reachability
from support.net import free_port


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(port: int) -> http.server.HTTPServer:
    server = http.server.HTTPServer(("127.0.0.1", port), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_unreachable_tracking_server_is_said_once_and_its_return_once():
    port = free_port()
    out = io.StringIO()
    reach = _Reachability(Console(out), f"http://127.0.0.1:{port}")
    server = _serve(port)
    assert reach.check() and out.getvalue() == ""
    server.shutdown()
    server.server_close()
    assert [reach.check() for _ in range(3)] == [False, False, False]
    server = _serve(port)
    try:
        assert reach.check()
    finally:
        server.shutdown()
        server.server_close()
    assert out.getvalue().splitlines() == [
        f"  MLflow at http://127.0.0.1:{port} unreachable: training goes on, its metrics are queued and written "
        "when it is back",
        f"  MLflow at http://127.0.0.1:{port} reachable again",
    ]


def test_a_local_store_is_never_probed():
    out = io.StringIO()
    assert _Reachability(Console(out), "sqlite:///mlflow.db").check() and out.getvalue() == ""
