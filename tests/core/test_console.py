"""The progress view of long commands: epochs counted from 1, an ETA from the pace since the first epoch."""

import io

from liverseg.core import console
from liverseg.core.console import Console, EpochView


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
