"""The console: the progress view of long commands (epochs counted from 1, an ETA from the pace since
the first epoch), and one line when the tracking server stops answering and one when it is back (a real
HTTP server on 127.0.0.1 that answers /health, then goes away, then comes back on the same port)."""

import http.server
import io
import threading

from liverseg.core import console
from liverseg.core.console import Console, EpochView, _Reachability
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


def test_eta_counts_what_is_left_at_the_pace_since_the_first_epoch(monkeypatch):
    clock = iter([60.0, 70.0, 80.0])  # start-up took a minute, then 10 s per epoch
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    view = EpochView(Console(io.StringIO()), total=10, upper=True, start=0.0)
    for epoch in range(3):
        view.epoch("trial a", epoch, 4, {"val_dice": 0.5 + epoch / 10, "train_loss": 1.0})
    lines = view.console.stream.getvalue().splitlines()
    assert lines[0].startswith("  trial a epoch 1/4  val_dice 0.5000") and "ETA 9m00s" in lines[0]
    assert "[3 of at most 10 epochs, 1m20s elapsed, ETA 1m10s]" in lines[2]  # 7 left x 10 s, not x 27 s
    view.shrink(5)  # a trial stopped early: its epochs leave the estimate
    assert view.total == 5
