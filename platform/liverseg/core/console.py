"""Quiet output for long commands: library chatter goes to a log file, the terminal gets one progress view.

Ray's trial tables, config boxes and internal warnings, MLflow's notices and the workers' prints are
written to file descriptors 1 and 2 by this process and by the processes it starts; `quiet` points both
descriptors at `logs/<command>-<time>.log` for the duration of a command, so nothing escapes whatever
library writes it. What the user reads goes to the terminal's own stream: one line per finished epoch
(per trial, with the metric, elapsed time and ETA; a live bar on top when the terminal is a TTY) and the
command's result. `-v` leaves the descriptors alone (everything on the terminal, as before).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from liverseg.core import env


@dataclass
class Console:
    """The user's terminal while descriptors 1 and 2 go to `log_path` (None: nothing redirected)."""

    stream: IO[str]
    log_path: Path | None = None

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""


@contextmanager
def quiet(command: str, verbose: bool = False) -> Iterator[Console]:
    """Send fds 1 and 2 (this process and its children) to a fresh log file; yield the real terminal."""
    if verbose:
        yield Console(sys.stderr)
        return
    log_dir = env.log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    console = Console(terminal, path)
    console.line(f"{command}: details in {path} (-v prints them here)")
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        terminal.close()


def root_cause(exc: BaseException) -> str:
    """'TypeName: first line' of the innermost cause: a Ray Train worker's own exception, not Ray's wrapper."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: exception}
        nxt = (
            next(iter(failures.values()), None)
            if failures
            else getattr(exc, "controller_failure", None)  # ray.train.ControllerError
            or getattr(exc, "cause", None)  # RayTaskError: the remote exception
            or exc.__cause__
        )
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


@dataclass
class EpochView:
    """One line per finished epoch: who, epoch k/n (counted from 1, as everywhere a person reads it), the
    selection metric, elapsed time and ETA.

    `total` is the number of epochs expected over the whole command (trials x epochs for a search;
    `shrink` lowers it when a scheduler stops a trial early, so the ETA tightens; `upper`: the total is a
    bound, shown as such). The ETA is the pace since the first epoch times the epochs left: start-up
    (Ray, workers, data) is paid once, not once per epoch left.
    """

    console: Console
    total: int
    metric: str = "val_dice"
    upper: bool = False
    done: int = 0
    start: float = field(default_factory=time.monotonic)
    first: float | None = None  # when the first epoch ended
    best: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _eta(self, now: float) -> str:
        left = max(self.total - self.done, 0)
        if self.done > 2:  # epochs of parallel trials may end together: the pace needs a few
            return _clock((now - self.first) / (self.done - 1) * left)
        return _clock((now - self.start) / self.done * left)

    def epoch(self, who: str, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            now = time.monotonic()
            self.done += 1
            self.first = self.first or now
            value = metrics.get(self.metric)
            if isinstance(value, (int, float)) and (self.best is None or value > self.best):
                self.best = float(value)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            loss = metrics.get("train_loss")
            extra = f"  train_loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
            best = f" (best {self.best:.4f})" if self.best is not None else ""
            count = f"{self.done} of at most {self.total}" if self.upper else f"{self.done}/{self.total}"
            self.console.line(
                f"  {who} epoch {epoch + 1}/{epochs}  {self.metric} {shown}{best}{extra}  "
                f"[{count} epochs, {_clock(now - self.start)} elapsed, ETA {self._eta(now)}]"
            )

    def shrink(self, epochs_not_run: int) -> None:
        with self._lock:
            self.total = max(self.total - max(epochs_not_run, 0), self.done)


@dataclass
class _Reachability:
    """Whether an http(s) tracking server answers /health within 2 s; the console hears once when it stops
    answering (training goes on: rank 0 queues the metrics) and once when it is back."""

    console: Console
    uri: str
    down: bool = False

    def check(self) -> bool:
        if not str(self.uri).startswith(("http://", "https://")):
            return True
        import urllib.request

        try:
            urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=2).close()
            up = True
        except Exception:
            up = False
        if up == self.down:
            self.down = not up
            self.console.line(
                f"  MLflow at {self.uri} unreachable: training goes on, its metrics are queued and written when it is back"
                if self.down
                else f"  MLflow at {self.uri} reachable again"
            )
        return up


@contextmanager
def watch_run(view: EpochView | None, client: Any, run_id: str, first_epoch: int, epochs: int, who: str):
    """While the block runs, poll the MLflow run's per-epoch metrics and show each new epoch.

    Rank 0 logs them there (workers may be on other machines: MLflow is what the driver can see).
    """
    if view is None:
        yield
        return
    stop = threading.Event()
    reach = _Reachability(view.console, getattr(client, "tracking_uri", ""))

    def poll() -> None:
        shown = first_epoch
        while True:
            last = stop.wait(2.0)
            if not reach.check():
                continue  # said once; MLflow's own retries would hold this thread for minutes
            try:
                hist = {k: client.get_metric_history(run_id, k) for k in (view.metric, "train_loss")}
            except Exception:  # a busy SQLite file: try again next round
                continue
            by_step = {k: {m.step: m.value for m in v} for k, v in hist.items()}
            while shown in by_step[view.metric]:
                view.epoch(who, shown, epochs, {k: v.get(shown) for k, v in by_step.items()})
                shown += 1
            if last:
                return

    thread = threading.Thread(target=poll, name="liverseg-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
